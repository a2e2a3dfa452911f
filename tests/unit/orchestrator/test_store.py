"""The job store: schema migrations (Alembic), the one transition function, idempotency keys,
durability across reopen."""

from __future__ import annotations

import re
import sqlite3
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

from orchestrator.states import IllegalTransition, JobState
from orchestrator.store import (
    IdempotencyConflict,
    JobNotFound,
    JobStore,
    SchemaTooNew,
    TokenNotFound,
    submission_id_for,
)
from orchestrator.store.schema import (
    LEGACY_VERSIONS,
    MIGRATIONS_DIR,
    compare_type,
    head_revision,
    upgrade_to_head,
)
from orchestrator.store.tables import metadata

S = JobState

# Historical data: the schema that the pre-Alembic store (orchestrator/migrations.py, version 1)
# wrote, verbatim, with its version table. Never edit: databases like this exist.
LEGACY_V1_DDL = [
    """CREATE TABLE jobs (
        id VARCHAR(32) PRIMARY KEY,
        kind VARCHAR(16) NOT NULL,
        name VARCHAR(64) NOT NULL,
        state VARCHAR(16) NOT NULL,
        spec TEXT NOT NULL,
        max_retries INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        idempotency_key VARCHAR(255) UNIQUE,
        request_hash VARCHAR(64),
        metrics TEXT,
        metrics_at DOUBLE PRECISION,
        message TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    "CREATE INDEX ix_jobs_created_at ON jobs (created_at)",
    """CREATE TABLE job_events (
        job_id VARCHAR(32) NOT NULL REFERENCES jobs (id),
        seq INTEGER NOT NULL,
        from_state VARCHAR(16),
        to_state VARCHAR(16) NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, seq)
    )""",
    """CREATE TABLE attempts (
        job_id VARCHAR(32) NOT NULL REFERENCES jobs (id),
        number INTEGER NOT NULL,
        submission_id VARCHAR(128) NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        submitted_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION,
        ray_status VARCHAR(16),
        ray_message TEXT,
        exit_code INTEGER,
        PRIMARY KEY (job_id, number)
    )""",
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at DOUBLE PRECISION NOT NULL)",
]


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'orch.db'}")
    yield s
    s.close()


def _create(store, **kw):
    args = {"kind": "train", "name": "demo", "spec": {"name": "demo"}, "max_retries": 1} | kw
    return store.create(**args)


def _legacy_db(path, version=1):
    """A database file as the pre-Alembic code left it: one job two steps in, with an attempt."""
    conn = sqlite3.connect(path)
    for statement in LEGACY_V1_DDL:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'jobs, job events and attempts', 1.0)", (version,))
    conn.execute(
        "INSERT INTO jobs (id, kind, name, state, spec, max_retries, attempts, cancel_requested, idempotency_key,"
        " request_hash, metrics, metrics_at, message, created_at, updated_at) VALUES"
        " ('abc123', 'train', 'old', 'STARTING', '{\"name\": \"old\"}', 2, 1, 0, 'key-1', 'h1',"
        " '{\"step\": 7}', 5.0, 'submitting', 1.0, 4.0)"
    )
    conn.executemany("INSERT INTO job_events VALUES ('abc123', ?, ?, ?, ?, ?)", [
        (1, None, "PENDING", "accepted", 1.0), (2, "PENDING", "QUEUED", "picked up", 2.0),
        (3, "QUEUED", "STARTING", "submitting", 3.0),
    ])
    conn.execute("INSERT INTO attempts (job_id, number, submission_id, created_at, submitted_at)"
                 " VALUES ('abc123', 1, 'orch-abc123-1', 3.0, 3.5)")
    conn.commit()
    conn.close()


def _schema_drift(url):
    """What differs between the database's schema and orchestrator/store/tables.py (empty: nothing)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": compare_type}), metadata)
    finally:
        engine.dispose()


def _snapshot(path):
    conn = sqlite3.connect(path)
    try:
        # A table's lines as a set: batch copies emit its constraints in no fixed order.
        schema = sorted(((t, n, sorted(x.strip() for x in re.split(r",\s*\n|\n\)$", sql or "")))
                         for t, n, sql in conn.execute("SELECT type, name, sql FROM sqlite_master")), key=str)
        revisions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        rows = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("jobs", "job_events", "attempts")}
        return schema, revisions, rows
    finally:
        conn.close()


def test_fresh_db_is_wal_at_head_and_matches_the_tables(store, tmp_path):
    conn = sqlite3.connect(tmp_path / "orch.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    assert _schema_drift(store.url) == []


def test_pre_alembic_db_upgrades_to_head_and_keeps_its_rows(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path)
    url = f"sqlite:///{path}"
    s = JobStore(url)
    try:
        job = s.get("abc123")
        assert (job.state, job.name, job.spec, job.metrics, job.idempotency_key) == (
            S.STARTING, "old", {"name": "old"}, {"step": 7}, "key-1")
        assert [e.reason for e in job.events] == ["accepted", "picked up", "submitting"]
        assert job.current_attempt.submission_id == "orch-abc123-1" and job.current_attempt.submitted_at == 3.5
        # It goes on where it was: the next event number, the same idempotency key.
        assert s.transition("abc123", S.RUNNING, "ray: RUNNING").events[-1].seq == 4
        again, created = _create(s, idempotency_key="key-1", request_hash="h1")
        assert not created and again.id == "abc123"
    finally:
        s.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "schema_migrations" not in tables
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    assert _schema_drift(url) == []
    # Byte for byte the schema that a new database gets, and it still enforces uniqueness.
    JobStore(f"sqlite:///{tmp_path / 'fresh.db'}").close()
    assert _snapshot(path)[0] == _snapshot(tmp_path / "fresh.db")[0]
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO attempts (job_id, number, submission_id, created_at)"
                     " VALUES ('abc123', 2, 'orch-abc123-1', 9.0)")


def test_first_revision_is_exactly_the_pre_alembic_schema(tmp_path):
    """Stamping a pre-Alembic database at LEGACY_VERSIONS[1] is only right if that revision built the same."""
    def ddl(path):
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT IN"
                            " ('schema_migrations', 'alembic_version', 'sqlite_autoindex_schema_migrations_1',"
                            " 'sqlite_autoindex_alembic_version_1') ORDER BY name").fetchall()
        conn.close()
        return [(t, n, " ".join(sql.split()) if sql else None) for t, n, sql in rows]

    _legacy_db(tmp_path / "legacy.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'rev.db'}")
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, LEGACY_VERSIONS[1])
    engine.dispose()
    assert ddl(tmp_path / "rev.db") == ddl(tmp_path / "legacy.db")


def test_upgrade_is_idempotent(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path)
    url = f"sqlite:///{path}"
    JobStore(url).close()
    first = _snapshot(path)
    s = JobStore(url)
    s.close()
    assert _snapshot(path) == first
    engine = create_engine(url)
    with engine.begin() as conn:
        assert upgrade_to_head(conn) == ((head_revision(),), head_revision())
    engine.dispose()
    assert _snapshot(path) == first


def test_db_from_a_newer_release_is_refused_clearly(tmp_path):
    path = tmp_path / "orch.db"
    JobStore(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE alembic_version SET version_num = 'f00d_from_the_future'")
    conn.commit()
    with pytest.raises(SchemaTooNew, match="f00d_from_the_future.*upgrade the orchestrator"):
        JobStore(f"sqlite:///{path}")
    # Nothing was changed by the refusal.
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("f00d_from_the_future",)]


def test_pre_alembic_db_with_an_unknown_version_is_refused(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path, version=2)
    with pytest.raises(SchemaTooNew, match="pre-Alembic schema version 2"):
        JobStore(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(2,)]


def test_foreign_keys_are_enforced_after_migrating(store):
    # The migration turns them off on its connection (SQLite's recipe); they must come back on.
    with pytest.raises(IntegrityError), store._tx() as conn:
        conn.exec_driver_sql("INSERT INTO job_events VALUES ('no-such-job', 1, NULL, 'PENDING', 'x', 1.0)")


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


def test_jobs_carry_team_owner_priority_and_list_filters_by_team(store):
    a, _ = _create(store, name="a", team="nlp", owner="alice", priority="high")
    _create(store, name="b", team="cv", owner="bob")
    assert (a.team, a.owner, a.priority, a.preemptions) == ("nlp", "alice", "high", 0)
    again = store.get(a.id)
    assert (again.team, again.owner, again.priority, again.queue_position, again.queue_reason) == (
        "nlp", "alice", "high", None, None)
    jobs, total = store.list(team="nlp")
    assert total == 1 and [j.name for j in jobs] == ["a"]
    assert store.list()[1] == 2 and store.list(team="nobody")[1] == 0


def test_pre_team_jobs_belong_to_the_admin(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path)
    s = JobStore(f"sqlite:///{path}")
    try:
        job = s.get("abc123")
        assert (job.team, job.owner, job.priority, job.preemptions) == ("admin", "admin", "normal", 0)
        assert s.list(team="admin")[1] == 1
    finally:
        s.close()


def test_queue_places_and_preemptions(store):
    a, _ = _create(store, name="a")
    b, _ = _create(store, name="b")
    store.set_queue_many([(a.id, 1, "waiting for 2 GPU"), (b.id, 2, "behind a")])
    assert (store.get(a.id).queue_position, store.get(b.id).queue_reason) == (1, "behind a")
    store.set_queue(a.id, None, None)
    assert (store.get(a.id).queue_position, store.get(a.id).queue_reason) == (None, None)
    store.set_queue_many([])  # nothing to write is not an error
    assert store.add_preemption(b.id).preemptions == 1
    assert store.add_preemption(b.id).preemptions == 2 == store.get(b.id).preemptions
    with pytest.raises(JobNotFound):
        store.add_preemption("nope")


def test_teams_are_upserted_and_keep_what_is_not_given(store):
    assert store.teams() == {} and store.team("nlp").roots == () and store.team("nlp").max_priority == "normal"
    store.set_team("nlp", roots=["/data/nlp", "s3://bucket/nlp"])
    store.set_team("nlp", quotas={"gpu": 8})
    store.set_team("nlp", max_priority="high")
    nlp = store.teams()["nlp"]
    assert nlp.roots == ("/data/nlp", "s3://bucket/nlp") and nlp.quotas == {"gpu": 8.0} and nlp.max_priority == "high"
    assert store.set_team("nlp", roots=[]).quotas == {"gpu": 8.0}
    assert store.team("nlp").roots == () and store.team("nlp").max_priority == "high"



def test_tokens_are_stored_by_hash_and_revoked(store):
    t = store.create_token(user="alice", team="nlp", role="user", token_hash="ab" * 32, created_by="admin")
    assert store.token_by_hash("ab" * 32) == t and store.token_by_hash("cd" * 32) is None
    revoked, token_hash = store.revoke_token(t.id)
    assert revoked.revoked and token_hash == "ab" * 32
    assert store.revoke_token(t.id)[0].revoked_at == revoked.revoked_at  # the first time is kept
    assert store.tokens() == [] and [x.id for x in store.tokens(include_revoked=True)] == [t.id]
    with pytest.raises(TokenNotFound):
        store.revoke_token("tok_nope")


def test_audit_log_is_newest_first_and_filters_by_team(store):
    store.audit("alice", "submit", "j1", team="nlp")
    store.audit("bob", "submit", "j2", team="cv")
    store.audit("scheduler", "preempt", "j1", detail="for j3 (high)", team="nlp")
    entries, total = store.audit_log(team="nlp")
    assert total == 2 and [(e.actor, e.action) for e in entries] == [("scheduler", "preempt"), ("alice", "submit")]
    assert entries[0].detail == "for j3 (high)" and entries[0].seq > entries[1].seq
    assert store.audit_log(limit=1, offset=1)[0][0].actor == "bob" and store.audit_log()[1] == 3
