"""a team's highest priority

Revision ID: 0006
Revises: 0005
Create Date: 2025-01-01

One new column, ``teams.max_priority``: the highest priority the team's users may submit at (set by
an admin, ``orch team set TEAM --max-priority high``). Every existing team gets ``normal``, the
default for a new one: ``high`` (which preempts other teams' jobs) is granted, never assumed. Plain
``ADD COLUMN`` with a server default, as in 0003. Frozen history: never edit a released revision,
add the next one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("teams", sa.Column("max_priority", sa.String(8), nullable=False,
                                     server_default=sa.text("'normal'")))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("max_priority")
