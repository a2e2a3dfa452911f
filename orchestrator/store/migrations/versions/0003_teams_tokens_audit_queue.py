"""teams, tokens and audit; a job's team, owner, priority, preemptions and queue place

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-01

Rows from before teams belong to the bootstrap admin (team and owner ``admin``, priority ``normal``):
the admin saw every job then and still does. Plain ``ADD COLUMN`` with a server default works on
SQLite and PostgreSQL alike and keeps every row in place (no table copy).
Frozen history: never edit a released revision, add the next one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

def _job_columns() -> list[sa.Column]:
    """Made per run: a Column belongs to the one table it is first added to."""
    return [
        sa.Column("team", sa.String(64), nullable=False, server_default=sa.text("'admin'")),
        sa.Column("owner", sa.String(64), nullable=False, server_default=sa.text("'admin'")),
        sa.Column("priority", sa.String(8), nullable=False, server_default=sa.text("'normal'")),
        sa.Column("preemptions", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("queue_reason", sa.Text),
        sa.Column("queue_position", sa.Integer),
    ]


def upgrade() -> None:
    for column in _job_columns():
        op.add_column("jobs", column)
    op.create_index("ix_jobs_state_priority", "jobs", ["state", "priority"])
    op.create_index("ix_jobs_team_created_at", "jobs", ["team", "created_at"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("revoked_at", sa.DOUBLE_PRECISION),
    )
    op.create_table(
        "teams",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("roots", sa.Text, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("quotas", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("team", sa.String(64)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=sa.text("''")),
    )
    op.create_index("ix_audit_team_seq", "audit", ["team", "seq"])


def downgrade() -> None:
    op.drop_index("ix_audit_team_seq", "audit")
    for table in ("audit", "teams", "tokens"):
        op.drop_table(table)
    op.drop_index("ix_jobs_team_created_at", "jobs")
    op.drop_index("ix_jobs_state_priority", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_job_columns()):
            batch.drop_column(column.name)
