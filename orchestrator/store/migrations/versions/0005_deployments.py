"""serving deployments

Revision ID: 0005
Revises: 0004
Create Date: 2025-01-01

One new table, ``deployments``: the set of Ray Serve applications the service keeps running
(orchestrator/deployments.py). No existing row changes. Frozen history: never edit a released
revision, add the next one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("route_prefix", sa.String(128), nullable=False, unique=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("replicas", sa.Text, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("deploys", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("deletes", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("updated_at", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("checked_at", sa.DOUBLE_PRECISION),
    )
    op.create_index("ix_deployments_team_created_at", "deployments", ["team", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_deployments_team_created_at", "deployments")
    op.drop_table("deployments")
