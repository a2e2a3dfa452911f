"""The durable store: ``Store`` and the records its repositories hand out.

``Store`` (``database``) owns one database: the engine, the write lock and the transaction helper
(``transactions``), the migration at every open (``schema`` and the Alembic revisions in
``migrations/``), ``ping`` and ``close``. It exposes one repository per aggregate, each given the
shared transactions and writing only its own tables:

* ``store.jobs`` (``jobs``): jobs, their state history and attempts, queue places, resize requests,
  preemptions; ``store.jobs.transition`` is the one place a job changes state;
* ``store.teams``, ``store.tokens``, ``store.audit`` (``access``): teams, user tokens, the audit log;
* ``store.deployments`` (``deployments``): serving deployments.

``tables`` is the one schema definition; ``records`` the immutable job, team, token and audit records.
"""

from orchestrator.store.database import Store
from orchestrator.store.deployments import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentRecord,
    DeploymentStatus,
    delete_submission_id,
    deploy_submission_id,
    new_deployment_id,
)
from orchestrator.store.records import (
    AttemptRecord,
    AuditRecord,
    EventRecord,
    IdempotencyConflict,
    JobNotFound,
    JobRecord,
    ResizeConflict,
    TeamRecord,
    TokenNotFound,
    TokenRecord,
    new_job_id,
    submission_id_for,
)
from orchestrator.store.schema import SchemaTooNew
from orchestrator.store.tables import (
    attempts_t,
    audit_t,
    deployments_t,
    events_t,
    jobs_t,
    metadata,
    teams_t,
    tokens_t,
)
from orchestrator.store.transactions import SQLITE_BUSY_TIMEOUT_MS

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "AttemptRecord",
    "AuditRecord",
    "DeploymentConflict",
    "DeploymentNotFound",
    "DeploymentRecord",
    "DeploymentStatus",
    "EventRecord",
    "IdempotencyConflict",
    "JobNotFound",
    "JobRecord",
    "ResizeConflict",
    "SchemaTooNew",
    "Store",
    "TeamRecord",
    "TokenNotFound",
    "TokenRecord",
    "attempts_t",
    "audit_t",
    "delete_submission_id",
    "deploy_submission_id",
    "deployments_t",
    "events_t",
    "jobs_t",
    "metadata",
    "new_deployment_id",
    "new_job_id",
    "submission_id_for",
    "teams_t",
    "tokens_t",
]
