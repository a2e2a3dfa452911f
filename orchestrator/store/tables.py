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
    # Who may see the job (its team) and who submitted it; rows from before teams belong to the admin.
    Column("team", String(64), nullable=False, server_default=text("'admin'")),
    Column("owner", String(64), nullable=False, server_default=text("'admin'")),
    Column("priority", String(8), nullable=False, server_default=text("'normal'")),  # low | normal | high
    Column("preemptions", Integer, nullable=False, server_default=text("0")),
    # Why a QUEUED job waits and its place in the queue, as the scheduler's last pass saw it.
    Column("queue_reason", Text),
    Column("queue_position", Integer),
    # Attempts ended by a user's resize (no retry used), and the spec (JSON) a RUNNING job restarts
    # with once the resize asked for has stopped it (moved into ``spec`` when it leaves RESIZING).
    Column("resizes", Integer, nullable=False, server_default=text("0")),
    Column("resize_spec", Text),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_state_priority", "state", "priority"),
    Index("ix_jobs_team_created_at", "team", "created_at"),
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

# API tokens of users (the bootstrap admin token is a setting, never stored). Only the SHA-256 of the
# secret is kept: a leaked database grants nothing. ``id`` is the public handle used to revoke.
tokens_t = Table(
    "tokens", metadata,
    Column("id", String(32), primary_key=True),
    Column("user", String(64), nullable=False),
    Column("team", String(64), nullable=False),
    Column("role", String(8), nullable=False),  # user | admin | scrape
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DOUBLE_PRECISION, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("revoked_at", DOUBLE_PRECISION),
)

# Per-team settings an admin sets: data roots (JSON list of local folders and s3:// prefixes),
# quotas (JSON object: pool or device name -> devices, GPUs/NPUs for gpu/npu pools, CPUs for cpu) and
# the highest priority the team's users may submit at.
teams_t = Table(
    "teams", metadata,
    Column("name", String(64), primary_key=True),
    Column("roots", Text, nullable=False, server_default=text("'[]'")),
    Column("quotas", Text, nullable=False, server_default=text("'{}'")),
    Column("max_priority", String(8), nullable=False, server_default=text("'normal'")),  # low | normal | high
    Column("updated_at", DOUBLE_PRECISION, nullable=False),
)

# Who did what to which object: submit, cancel, resize, preempt, token and team changes. Append-only.
audit_t = Table(
    "audit", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", DOUBLE_PRECISION, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("team", String(64)),  # the team whose object it was; None for service-wide actions
    Column("action", String(32), nullable=False),
    Column("target", String(128), nullable=False),
    Column("detail", Text, nullable=False, server_default=text("''")),
    Index("ix_audit_team_seq", "team", "seq"),
)

# Serving deployments (orchestrator/deployments/reconciler.py reconciles Ray Serve with these rows). ``spec`` is
# the ServeSpec as deployed (JSON: the resolved checkpoint and the bearer key's SHA-256, never the
# key). Names and route prefixes are unique: both are Serve's, cluster-wide. A row lives until Serve
# has dropped its application; the audit log keeps the history.
deployments_t = Table(
    "deployments", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("route_prefix", String(128), nullable=False, unique=True),
    Column("team", String(64), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("spec", Text, nullable=False),
    Column("source", Text),  # where the checkpoint came from: the path given, "job <id>", "sweep <id> trial <t>"
    Column("status", String(16), nullable=False),
    Column("message", Text),
    Column("replicas", Text, nullable=False, server_default=text("'{}'")),  # replica state -> count
    # Deploy and delete Ray jobs submitted so far (each one's submission id derives from its number),
    # and failed ones in a row (the reconciler gives up after ORCH_DEPLOY_MAX_FAILURES).
    Column("deploys", Integer, nullable=False, server_default=text("0")),
    Column("deletes", Integer, nullable=False, server_default=text("0")),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DOUBLE_PRECISION, nullable=False),
    Column("updated_at", DOUBLE_PRECISION, nullable=False),
    Column("checked_at", DOUBLE_PRECISION),  # the reconciler's last look at Serve
    Index("ix_deployments_team_created_at", "team", "created_at"),
)
