"""The store's schema: Alembic migrations from an empty, a pre-Alembic and a newer release's database,
never a drift from tables.py, foreign keys on after migrating."""

from __future__ import annotations

import re
import sqlite3

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError

from orchestrator.states import JobState
from orchestrator.store import SchemaTooNew, Store
from orchestrator.store.schema import (
    LEGACY_VERSIONS,
    MIGRATIONS_DIR,
    compare_type,
    head_revision,
    upgrade_to_head,
)
from orchestrator.store.tables import metadata
from tests.support.store import create_job

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
    s = Store(url)
    try:
        job = s.jobs.get("abc123")
        assert (job.state, job.name, job.spec, job.metrics, job.idempotency_key) == (
            S.STARTING, "old", {"name": "old"}, {"step": 7}, "key-1")
        assert [e.reason for e in job.events] == ["accepted", "picked up", "submitting"]
        assert job.current_attempt.submission_id == "orch-abc123-1" and job.current_attempt.submitted_at == 3.5
        # It goes on where it was: the next event number, the same idempotency key.
        assert s.jobs.transition("abc123", S.RUNNING, "ray: RUNNING").events[-1].seq == 4
        again, created = create_job(s, idempotency_key="key-1", request_hash="h1")
        assert not created and again.id == "abc123"
    finally:
        s.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "schema_migrations" not in tables
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    assert _schema_drift(url) == []
    # Byte for byte the schema that a new database gets, and it still enforces uniqueness.
    Store(f"sqlite:///{tmp_path / 'fresh.db'}").close()
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
    Store(url).close()
    first = _snapshot(path)
    s = Store(url)
    s.close()
    assert _snapshot(path) == first
    engine = create_engine(url)
    with engine.begin() as conn:
        assert upgrade_to_head(conn) == ((head_revision(),), head_revision())
    engine.dispose()
    assert _snapshot(path) == first


def test_db_from_a_newer_release_is_refused_clearly(tmp_path):
    path = tmp_path / "orch.db"
    Store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE alembic_version SET version_num = 'f00d_from_the_future'")
    conn.commit()
    with pytest.raises(SchemaTooNew, match="f00d_from_the_future.*upgrade the orchestrator"):
        Store(f"sqlite:///{path}")
    # Nothing was changed by the refusal.
    assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("f00d_from_the_future",)]


def test_pre_alembic_db_with_an_unknown_version_is_refused(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path, version=2)
    with pytest.raises(SchemaTooNew, match="pre-Alembic schema version 2"):
        Store(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(2,)]


def test_foreign_keys_are_enforced_after_migrating(store):
    # The migration turns them off on its connection (SQLite's recipe); they must come back on.
    with pytest.raises(IntegrityError), store._tx() as conn:
        conn.exec_driver_sql("INSERT INTO job_events VALUES ('no-such-job', 1, NULL, 'PENDING', 'x', 1.0)")


def test_pre_team_jobs_belong_to_the_admin(tmp_path):
    path = tmp_path / "orch.db"
    _legacy_db(path)
    s = Store(f"sqlite:///{path}")
    try:
        job = s.jobs.get("abc123")
        assert (job.team, job.owner, job.priority, job.preemptions) == ("admin", "admin", "normal", 0)
        assert s.jobs.list(team="admin")[1] == 1
    finally:
        s.close()
