"""``store.jobs``: the one transition function, idempotency keys, cancel and listing, queue places and
preemptions, durability across reopen."""

from __future__ import annotations

import threading

import pytest

from orchestrator.states import IllegalTransition, JobState
from orchestrator.store import IdempotencyConflict, JobNotFound, Store, submission_id_for
from tests.support.store import create_job

S = JobState


def test_transitions_are_stored_with_reasons_and_attempts_get_derived_ids(store):
    job, created = create_job(store)
    assert created and job.state is S.PENDING
    store.jobs.transition(job.id, S.QUEUED, "picked up")
    job = store.jobs.transition(job.id, S.STARTING, "submitting", new_attempt=True)
    assert job.attempts == 1
    assert job.current_attempt.submission_id == submission_id_for(job.id, 1)
    job = store.jobs.transition(job.id, S.RUNNING, "ray: RUNNING")
    assert [(e.from_state, e.to_state, e.reason) for e in job.events] == [
        (None, S.PENDING, "accepted"),
        (S.PENDING, S.QUEUED, "picked up"),
        (S.QUEUED, S.STARTING, "submitting"),
        (S.STARTING, S.RUNNING, "ray: RUNNING"),
    ]


def test_terminal_states_never_go_back(store):
    job, _ = create_job(store)
    store.jobs.transition(job.id, S.CANCELLED, "user")
    for target in S:
        with pytest.raises(IllegalTransition):
            store.jobs.transition(job.id, target, "no")
    assert store.jobs.get(job.id).state is S.CANCELLED
    assert len(store.jobs.get(job.id).events) == 2


def test_illegal_move_changes_nothing(store):
    job, _ = create_job(store)
    with pytest.raises(IllegalTransition):
        store.jobs.transition(job.id, S.RUNNING, "skip ahead")
    assert store.jobs.get(job.id).state is S.PENDING


def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        store.jobs.get("nope")
    with pytest.raises(JobNotFound):
        store.jobs.transition("nope", S.QUEUED, "x")


def test_idempotency_key_returns_the_same_job_and_rejects_another_body(store):
    a, created_a = create_job(store, idempotency_key="k1", request_hash="h1")
    b, created_b = create_job(store, idempotency_key="k1", request_hash="h1")
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(IdempotencyConflict):
        create_job(store, idempotency_key="k1", request_hash="h2")
    assert store.jobs.list()[1] == 1


def test_concurrent_creates_with_one_key_store_one_job(store):
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait(timeout=10)
        results.append(create_job(store, idempotency_key="same", request_hash="h"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_cancel_request_and_listing(store):
    a, _ = create_job(store, name="a")
    b, _ = create_job(store, name="b")
    assert store.jobs.request_cancel(a.id).cancel_requested
    store.jobs.transition(b.id, S.FAILED, "bad")
    assert not store.jobs.request_cancel(b.id).cancel_requested  # terminal: unchanged
    jobs, total = store.jobs.list(states=[S.PENDING])
    assert total == 1 and [j.id for j in jobs] == [a.id]
    assert [j.id for j in store.jobs.unfinished()] == [a.id]
    assert store.jobs.count_by_state()[S.FAILED] == 1


def test_everything_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'orch.db'}"
    s = Store(url)
    job, _ = create_job(s)
    s.jobs.transition(job.id, S.QUEUED, "q")
    s.jobs.set_metrics(job.id, {"step": 3, "loss": 2.5})
    s.close()
    again = Store(url).jobs.get(job.id)
    assert again.state is S.QUEUED and again.metrics == {"step": 3, "loss": 2.5} and len(again.events) == 2


def test_jobs_carry_team_owner_priority_and_list_filters_by_team(store):
    a, _ = create_job(store, name="a", team="nlp", owner="alice", priority="high")
    create_job(store, name="b", team="cv", owner="bob")
    assert (a.team, a.owner, a.priority, a.preemptions) == ("nlp", "alice", "high", 0)
    again = store.jobs.get(a.id)
    assert (again.team, again.owner, again.priority, again.queue_position, again.queue_reason) == (
        "nlp", "alice", "high", None, None)
    jobs, total = store.jobs.list(team="nlp")
    assert total == 1 and [j.name for j in jobs] == ["a"]
    assert store.jobs.list()[1] == 2 and store.jobs.list(team="nobody")[1] == 0


def test_queue_places_and_preemptions(store):
    a, _ = create_job(store, name="a")
    b, _ = create_job(store, name="b")
    store.jobs.set_queue_many([(a.id, 1, "waiting for 2 GPU"), (b.id, 2, "behind a")])
    assert (store.jobs.get(a.id).queue_position, store.jobs.get(b.id).queue_reason) == (1, "behind a")
    store.jobs.set_queue(a.id, None, None)
    assert (store.jobs.get(a.id).queue_position, store.jobs.get(a.id).queue_reason) == (None, None)
    store.jobs.set_queue_many([])  # nothing to write is not an error
    assert store.jobs.add_preemption(b.id).preemptions == 1
    assert store.jobs.add_preemption(b.id).preemptions == 2 == store.jobs.get(b.id).preemptions
    with pytest.raises(JobNotFound):
        store.jobs.add_preemption("nope")
