"""The durable job store: ``JobStore`` and the records it hands out.

Split by concern: ``tables`` (the one schema definition), ``records`` (immutable job records),
``repository`` (``JobStore``: reads and the one transition function), ``access`` (teams, user
tokens, the audit log), ``deployments`` (serving deployments), ``schema`` and ``migrations/``
(Alembic revisions, applied at every open).
"""

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
from orchestrator.store.repository import SQLITE_BUSY_TIMEOUT_MS, JobStore
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
    "JobStore",
    "ResizeConflict",
    "SchemaTooNew",
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
