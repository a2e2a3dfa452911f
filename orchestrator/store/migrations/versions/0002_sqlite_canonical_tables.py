"""SQLite: rebuild jobs and attempts in SQLAlchemy's own DDL form

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-01

Revision 0001's hand-written DDL leaves two traps on SQLite: ``id VARCHAR(32) PRIMARY KEY`` admits NULL
(a SQLite quirk), and SQLAlchemy's reflection cannot see a column's inline ``UNIQUE`` after a type
with a length, so a later batch (copy-and-rename) migration would silently drop the uniqueness of
idempotency keys and submission ids. Copying both tables into the form below fixes both and keeps
every row. Other databases already read 0001 correctly: nothing to do there.
Frozen history: never edit a released revision, add the next one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_md = sa.MetaData()
JOBS = sa.Table(
    "jobs", _md,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.text("FALSE")),
    sa.Column("idempotency_key", sa.String(255), unique=True),
    sa.Column("request_hash", sa.String(64)),
    sa.Column("metrics", sa.Text),
    sa.Column("metrics_at", sa.DOUBLE_PRECISION),
    sa.Column("message", sa.Text),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Index("ix_jobs_state", "state"),
    sa.Index("ix_jobs_created_at", "created_at"),
)
ATTEMPTS = sa.Table(
    "attempts", _md,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("submission_id", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
    sa.Column("submitted_at", sa.DOUBLE_PRECISION),
    sa.Column("ended_at", sa.DOUBLE_PRECISION),
    sa.Column("ray_status", sa.String(16)),
    sa.Column("ray_message", sa.Text),
    sa.Column("exit_code", sa.Integer),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in (JOBS, ATTEMPTS):
        with op.batch_alter_table(table.name, recreate="always", copy_from=table):
            pass


def downgrade() -> None:
    """Nothing: 0001's form holds the same rows under the same rules (less the traps above)."""
