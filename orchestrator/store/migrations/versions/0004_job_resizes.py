"""a job's resizes and the spec it restarts with after a resize in flight

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-01

``resizes`` counts the attempts that ended because a user resized the job (like ``preemptions``,
they use up no retry); ``resize_spec`` holds the spec a RUNNING job restarts with once the resize a
user asked for has stopped it (moved into ``spec`` when it leaves RESIZING). Plain ``ADD COLUMN``:
every row stays in place. Frozen history: never edit a released revision, add the next one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _job_columns() -> list[sa.Column]:
    """Made per run: a Column belongs to the one table it is first added to."""
    return [
        sa.Column("resizes", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("resize_spec", sa.Text),
    ]


def upgrade() -> None:
    for column in _job_columns():
        op.add_column("jobs", column)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_job_columns()):
            batch.drop_column(column.name)
