"""The job store: migrations, the one transition function, idempotency keys, durability across reopen."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from orchestrator.migrations import LATEST_VERSION
from orchestrator.states import IllegalTransition, JobState
from orchestrator.store import IdempotencyConflict, JobNotFound, JobStore, submission_id_for

S = JobState


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'orch.db'}")
    yield s
    s.close()


def _create(store, **kw):
    args = {"kind": "train", "name": "demo", "spec": {"name": "demo"}, "max_retries": 1} | kw
    return store.create(**args)


def test_sqlite_is_wal_and_migrations_are_recorded(store, tmp_path):
    conn = sqlite3.connect(tmp_path / "orch.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, LATEST_VERSION + 1))
    # Reopening does not run them again.
    JobStore(f"sqlite:///{tmp_path / 'orch.db'}").close()
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == LATEST_VERSION


def test_transitions_are_stored_with_reasons_and_attempts_get_derived_ids(store):
    job, created = _create(store)
    assert created and job.state is S.PENDING
    store.transition(job.id, S.QUEUED, "picked up")
    job = store.transition(job.id, S.STARTING, "submitting", new_attempt=True)
    assert job.attempts == 1
    assert job.current_attempt.submission_id == submission_id_for(job.id, 1)
    job = store.transition(job.id, S.RUNNING, "ray: RUNNING")
    assert [(e.from_state, e.to_state, e.reason) for e in job.events] == [
        (None, S.PENDING, "accepted"),
        (S.PENDING, S.QUEUED, "picked up"),
        (S.QUEUED, S.STARTING, "submitting"),
        (S.STARTING, S.RUNNING, "ray: RUNNING"),
    ]


def test_terminal_states_never_go_back(store):
    job, _ = _create(store)
    store.transition(job.id, S.CANCELLED, "user")
    for target in S:
        with pytest.raises(IllegalTransition):
            store.transition(job.id, target, "no")
    assert store.get(job.id).state is S.CANCELLED
    assert len(store.get(job.id).events) == 2


def test_illegal_move_changes_nothing(store):
    job, _ = _create(store)
    with pytest.raises(IllegalTransition):
        store.transition(job.id, S.RUNNING, "skip ahead")
    assert store.get(job.id).state is S.PENDING


def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.transition("nope", S.QUEUED, "x")


def test_idempotency_key_returns_the_same_job_and_rejects_another_body(store):
    a, created_a = _create(store, idempotency_key="k1", request_hash="h1")
    b, created_b = _create(store, idempotency_key="k1", request_hash="h1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(IdempotencyConflict):
        _create(store, idempotency_key="k1", request_hash="h2")
    assert store.list()[1] == 1


def test_concurrent_creates_with_one_key_store_one_job(store):
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait(timeout=10)
        results.append(_create(store, idempotency_key="same", request_hash="h"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_cancel_request_and_listing(store):
    a, _ = _create(store, name="a")
    b, _ = _create(store, name="b")
    assert store.request_cancel(a.id).cancel_requested
    store.transition(b.id, S.FAILED, "bad")
    assert not store.request_cancel(b.id).cancel_requested  # terminal: unchanged
    jobs, total = store.list(states=[S.PENDING])
    assert total == 1 and [j.id for j in jobs] == [a.id]
    assert [j.id for j in store.unfinished()] == [a.id]
    assert store.count_by_state()[S.FAILED] == 1


def test_everything_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'orch.db'}"
    s = JobStore(url)
    job, _ = _create(s)
    s.transition(job.id, S.QUEUED, "q")
    s.set_metrics(job.id, {"step": 3, "loss": 2.5})
    s.close()
    again = JobStore(url).get(job.id)
    assert again.state is S.QUEUED and again.metrics == {"step": 3, "loss": 2.5} and len(again.events) == 2
