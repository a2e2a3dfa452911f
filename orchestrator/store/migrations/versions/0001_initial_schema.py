"""jobs, job events and attempts: the pre-Alembic store's schema (its ``schema_migrations`` version 1)

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The statements are the hand-written DDL of that store, verbatim, so that a database it built is exactly
at this revision and is stamped here without running anything (``orchestrator/store/schema.py``).
Frozen history: never edit a released revision, add the next one.
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATEMENTS = [
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
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("job_events")
    op.drop_table("jobs")
