"""``store.deployments``: serving deployments, stored beside the jobs: the set of Ray Serve applications
the service keeps running. The API writes the intent (create, delete request); the controller's
scheduler admits a QUEUED deployment or says why it waits (``record_queue``, the only write while it
is QUEUED); the reconciler (orchestrator/deployments/reconciler.py) is the only writer of what Serve
reports and of the deploy/delete counters, and never touches a QUEUED deployment.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from orchestrator.store.tables import deployments_t
from orchestrator.store.transactions import Transactions


class DeploymentStatus(str, Enum):
    QUEUED = "QUEUED"  # stored; waits for the scheduler to admit its replicas (the message says why)
    PENDING = "PENDING"  # admitted; the reconciler has not submitted its deploy yet
    DEPLOYING = "DEPLOYING"  # its deploy job runs, or Serve starts its replicas
    RUNNING = "RUNNING"  # Serve reports the application RUNNING: it answers
    UNHEALTHY = "UNHEALTHY"  # Serve reports replicas failing health checks (Serve replaces them)
    DEPLOY_FAILED = "DEPLOY_FAILED"  # the last deploy failed; the reconciler tries again
    FAILED = "FAILED"  # given up: deploys failed ORCH_DEPLOY_MAX_FAILURES times in a row, or the
    #                    name belongs to a Serve application this service did not create
    DELETING = "DELETING"  # delete asked; the row goes once Serve no longer has the application


class DeploymentNotFound(KeyError):
    pass


class DeploymentConflict(ValueError):
    """The name or route prefix is taken (or overlaps another deployment's prefix)."""


def new_deployment_id() -> str:
    return f"d{secrets.token_hex(6)}"  # 48 random bits; the "d" tells it from a job id at a glance


def deploy_submission_id(deployment_id: str, number: int) -> str:
    """Ray's submission id of a deployment's ``number``-th deploy job (a resubmission after a crash
    reuses it, and Ray refuses a second job under the same id)."""
    return f"orch-deploy-{deployment_id}-{number}"


def delete_submission_id(deployment_id: str, number: int) -> str:
    return f"orch-undeploy-{deployment_id}-{number}"


@dataclass(frozen=True)
class DeploymentRecord:
    id: str
    name: str
    route_prefix: str
    team: str
    owner: str
    spec: dict[str, Any]
    source: str | None
    status: DeploymentStatus
    message: str | None
    replicas: dict[str, int] = field(default_factory=dict)
    deploys: int = 0
    deletes: int = 0
    failures: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    checked_at: float | None = None

    @property
    def checkpoint(self) -> str:
        return self.spec["checkpoint"]

    @property
    def holds(self) -> bool:
        """Whether its replicas hold (or are admitted to take) their booking: admitted and neither
        given up nor deleted before any deploy (a DELETING one holds until its row goes)."""
        never_deployed = self.deploys == 0 and self.status is DeploymentStatus.DELETING
        return self.status not in (DeploymentStatus.QUEUED, DeploymentStatus.FAILED) and not never_deployed


def _record(row: Any) -> DeploymentRecord:
    m = dict(row._mapping)
    m.update(spec=json.loads(m["spec"]), replicas=json.loads(m["replicas"]), status=DeploymentStatus(m["status"]))
    return DeploymentRecord(**m)


def _components(prefix: str) -> tuple[str, ...]:
    return tuple(p for p in prefix.split("/") if p)


def prefixes_overlap(a: str, b: str) -> bool:
    """Serve routes a request to the longest matching prefix, so a prefix inside another deployment's
    (``/alpha/v1`` under ``/alpha``) would take over that deployment's routes, and its callers' keys."""
    ca, cb = _components(a), _components(b)
    return ca[:len(cb)] == cb or cb[:len(ca)] == ca


# Columns the reconciler may set (status, what Serve says, counters); the API sets none of them.
_RECONCILED = frozenset({"status", "message", "replicas", "deploys", "deletes", "failures", "checked_at"})


class DeploymentRepository:
    def __init__(self, tx: Transactions):
        self._tx = tx

    def create(self, *, name: str, route_prefix: str, team: str, owner: str, spec: dict[str, Any],
                          source: str | None, deployment_id: str | None = None) -> DeploymentRecord:
        """Store a new deployment (PENDING); DeploymentConflict if its name is taken or its prefix
        overlaps a stored deployment's (any team's: both are one namespace on the Serve cluster)."""
        now = time.time()
        record = DeploymentRecord(id=deployment_id or new_deployment_id(), name=name, route_prefix=route_prefix,
                                  team=team, owner=owner, spec=spec, source=source,
                                  status=DeploymentStatus.QUEUED, message="waiting for the scheduler",
                                  created_at=now, updated_at=now)
        with self._tx() as conn:
            for other in conn.execute(select(deployments_t.c.name, deployments_t.c.route_prefix)):
                if other.name == name:
                    raise DeploymentConflict(f"name: a deployment named {name!r} exists; choose another name")
                if prefixes_overlap(other.route_prefix, route_prefix):
                    raise DeploymentConflict(f"route_prefix: {route_prefix!r} overlaps the prefix "
                                             f"{other.route_prefix!r} of another deployment")
            values = {**record.__dict__, "status": record.status.value, "spec": json.dumps(spec),
                      "replicas": json.dumps(record.replicas)}
            try:
                conn.execute(deployments_t.insert().values(**values))
            except IntegrityError:  # another API process took the name between our check and insert
                raise DeploymentConflict(f"name or route_prefix: {name!r} / {route_prefix!r} was just taken") from None
        return record

    def get(self, deployment_id: str) -> DeploymentRecord:
        with self._tx(write=False) as conn:
            row = conn.execute(select(deployments_t).where(deployments_t.c.id == deployment_id)).first()
        if row is None:
            raise DeploymentNotFound(deployment_id)
        return _record(row)

    def list(self, team: str | None = None, limit: int | None = None,
                    offset: int = 0) -> tuple[list[DeploymentRecord], int]:
        """Deployments newest first, and how many match in all; ``team``: that team's only."""
        q = select(deployments_t).order_by(deployments_t.c.created_at.desc(), deployments_t.c.id).offset(offset)
        count_q = select(func.count()).select_from(deployments_t)
        if team is not None:
            q, count_q = q.where(deployments_t.c.team == team), count_q.where(deployments_t.c.team == team)
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
            total = conn.execute(count_q).scalar_one()
        return [_record(r) for r in rows], total

    def update(self, deployment_id: str, **values: Any) -> DeploymentRecord:
        """Store what the reconciler did or saw (only the columns in ``_RECONCILED``). A row asked to
        be deleted stays DELETING whatever Serve reports. DeploymentNotFound if it is gone."""
        unknown = set(values) - _RECONCILED
        if unknown:
            raise ValueError(f"not reconciler columns: {sorted(unknown)}")
        with self._tx() as conn:
            row = conn.execute(select(deployments_t).where(deployments_t.c.id == deployment_id)).first()
            if row is None:
                raise DeploymentNotFound(deployment_id)
            if row.status == DeploymentStatus.DELETING.value:
                values.pop("status", None)
            if "status" in values:
                values["status"] = DeploymentStatus(values["status"]).value
            if "replicas" in values:
                values["replicas"] = json.dumps(values["replicas"])
            conn.execute(deployments_t.update().where(deployments_t.c.id == deployment_id)
                         .values(**values, updated_at=time.time()))
            return _record(conn.execute(select(deployments_t).where(deployments_t.c.id == deployment_id)).one())

    def record_queue(self, admitted: Iterable[str], waiting: Iterable[tuple[str, str]]) -> None:
        """The scheduler's pass, in one transaction: ``admitted`` deployments go QUEUED -> PENDING (the
        reconciler deploys them); ``waiting`` ones (id, reason) keep QUEUED with the reason as their
        message. Only rows still QUEUED change (a delete asked meanwhile wins); unchanged rows are
        not written."""
        t = deployments_t
        queued = t.c.status == DeploymentStatus.QUEUED.value
        now = time.time()
        with self._tx() as conn:
            for deployment_id in admitted:
                conn.execute(t.update().where(t.c.id == deployment_id, queued).values(
                    status=DeploymentStatus.PENDING.value, message="admitted; waiting for the reconciler",
                    updated_at=now))
            for deployment_id, reason in waiting:
                conn.execute(t.update().where(t.c.id == deployment_id, queued, t.c.message.is_distinct_from(reason))
                             .values(message=reason, updated_at=now))

    def request_delete(self, deployment_id: str) -> DeploymentRecord:
        """Mark the deployment DELETING (asking again resets a delete that kept failing)."""
        with self._tx() as conn:
            found = conn.execute(deployments_t.update().where(deployments_t.c.id == deployment_id).values(
                status=DeploymentStatus.DELETING.value, message="delete requested", failures=0,
                updated_at=time.time())).rowcount
            if not found:
                raise DeploymentNotFound(deployment_id)
            return _record(conn.execute(select(deployments_t).where(deployments_t.c.id == deployment_id)).one())

    def remove(self, deployment_id: str) -> None:
        """Drop the row once Serve no longer has its application (the reconciler's last step)."""
        with self._tx() as conn:
            conn.execute(deployments_t.delete().where(deployments_t.c.id == deployment_id))
