"""Versioned schema migrations for the job store.

Each migration is a frozen list of DDL statements; ``schema_migrations`` records which versions ran.
Never edit a released migration: add the next version. The statements use types that SQLite and
PostgreSQL both accept (timestamps are epoch seconds as DOUBLE PRECISION).
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, text

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "jobs, job events and attempts",
        [
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
        ],
    ),
]

LATEST_VERSION = MIGRATIONS[-1][0]


def applied_versions(conn: Connection) -> set[int]:
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
    )
    return {row[0] for row in conn.execute(text("SELECT version FROM schema_migrations"))}


def migrate(conn: Connection) -> list[int]:
    """Apply every migration not yet recorded, in order, inside the caller's transaction."""
    done = applied_versions(conn)
    if done and max(done) > LATEST_VERSION:
        raise RuntimeError(f"the database has schema version {max(done)}, newer than this code ({LATEST_VERSION})")
    ran = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for statement in statements:
            conn.execute(text(statement))
        conn.execute(
            text("INSERT INTO schema_migrations (version, name, applied_at) VALUES (:v, :n, :t)"),
            {"v": version, "n": name, "t": time.time()},
        )
        ran.append(version)
    return ran
