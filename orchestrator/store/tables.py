"""The one definition of the job store's tables: queries use it, and Alembic compares migrations with it.

A change here needs a revision in ``migrations/versions`` (see ``schema.py``); a test fails while the
migrated schema and this module differ. Timestamps are epoch seconds as DOUBLE PRECISION, a type
SQLite and PostgreSQL both accept.
"""

from __future__ import annotations

from sqlalchemy import (
    DOUBLE_PRECISION,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

jobs_t = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("spec", Text, nullable=False),
    Column("max_retries", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("FALSE")),
    Column("idempotency_key", String(255), unique=True),
    Column("request_hash", String(64)),
    Column("metrics", Text),
    Column("metrics_at", DOUBLE_PRECISION),
    Column("message", Text),
    Column("created_at", DOUBLE_PRECISION, nullable=False),
    Column("updated_at", DOUBLE_PRECISION, nullable=False),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_created_at", "created_at"),
)

events_t = Table(
    "job_events", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", DOUBLE_PRECISION, nullable=False),
)

attempts_t = Table(
    "attempts", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id"), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("submission_id", String(128), nullable=False, unique=True),
    Column("created_at", DOUBLE_PRECISION, nullable=False),
    Column("submitted_at", DOUBLE_PRECISION),
    Column("ended_at", DOUBLE_PRECISION),
    Column("ray_status", String(16)),
    Column("ray_message", Text),
    Column("exit_code", Integer),
)
