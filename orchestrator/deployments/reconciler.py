"""The deployment reconciler (its thread: orchestrator/reconcile.py; what Serve says: serve_status.py): makes Ray Serve run exactly the stored deployments, and records what
Serve says about each. Separate from the job controller (its own thread, its own interval): serving
has no queue, no attempts and no states to move through, only a set to converge to.

How it acts on Ray:

* **Deploy** and **delete** are Ray jobs, submitted through the Jobs SDK like every job:
  ``python -m jobs.serve --spec FILE`` (deploys one application imperatively, under its own name
  and route prefix, and exits; the replicas outlive it) and ``python -m jobs.serve --delete NAME``.
  The same command a user runs with ``ray job submit``, so there is one code path for every way
  in; the service keeps no Ray driver and imports no torch (building the Serve application needs
  the model code); a remote cluster works like the local one. Submission ids derive from the
  deployment id and a stored counter, written before the call, so a crash never deploys twice.
* **Status** comes from Serve's read-only REST endpoint on the dashboard
  (``GET /api/serve/applications/``), one call per pass for every application.
* Never a declarative config (``PUT /api/serve/applications/``): it deletes every application
  missing from the set, including ones this service did not create. The reconciler only ever
  deletes an application it deployed and a user asked to delete.

Admission is not the reconciler's: a deployment is stored QUEUED and the controller's scheduler
(orchestrator/scheduler/service.py) admits it (PENDING) once its replicas fit its team's quota and
the pools' free capacity, counting them against both for as long as the deployment holds. The
reconciler never deploys a QUEUED deployment (it only removes one deleted while it waits), so
replicas never take resources the scheduler has not booked.

A non-admin team's deploy job gets ``ORCH_DATA_ROOTS`` (workers/confine.py): the team's local
data roots as they are at the deploy, plus the checkpoint folder pinned at creation (checked then
to lie under those roots or in the team's own job's output folder), so the driver and its replicas
open no file elsewhere, links resolved.

One pass, for each stored deployment: while its deploy or delete job runs, wait (a delete first
stops a deploy still running). A deployment whose application is missing (never deployed, deleted
behind the service's back, a restarted cluster) is deployed again; one whose deploy job failed is
retried until ``deploy_max_failures`` failures in a row, then FAILED. A name held by an application
the service never deployed is FAILED, never taken over. A DELETING deployment's row is dropped once
Serve no longer lists its application.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.controller.entrypoints import ALLOWED_ENTRYPOINTS, confinement_env
from orchestrator.deployments.serve_status import AppView, ServeStatus
from orchestrator.ray_client import RayJobs, RayJobView, RayRefused, RayUnavailable
from orchestrator.reconcile import ReconcileLoop
from orchestrator.settings import Settings
from orchestrator.store import (
    DeploymentNotFound,
    DeploymentRecord,
    DeploymentStatus,
    Store,
    delete_submission_id,
    deploy_submission_id,
)

log = logging.getLogger(__name__)
# jobs.serve's exit code for an invalid spec or checkpoint: deploying again cannot help.
SPEC_ERROR_EXIT_CODE = 2
# Characters of a failed Ray job's message kept on the deployment (the driver's last lines).
MESSAGE_MAX_CHARS = 2000
_SERVE_STATUS = {s.value for s in (DeploymentStatus.DEPLOYING, DeploymentStatus.RUNNING,
                                   DeploymentStatus.UNHEALTHY, DeploymentStatus.DEPLOY_FAILED)}


def deployment_dir(settings: Settings, deployment_id: str) -> Path:
    """Where a deployment's spec file lives: under the jobs folder, which Ray drivers can read (on a
    remote cluster: the shared mount ORCH_JOBS_DIR)."""
    return settings.job_root / "deployments" / deployment_id


def write_spec(settings: Settings, d: DeploymentRecord) -> Path:
    """The deployment's spec as the file ``jobs.serve --spec`` reads, written atomically."""
    folder = deployment_dir(settings, d.id)
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / "spec.json", folder / "spec.json.tmp"
    tmp.write_text(json.dumps(d.spec, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path



class DeploymentReconciler(ReconcileLoop):
    thread_name = "orch-deployments"

    def __init__(self, store: Store, ray: RayJobs, serve: ServeStatus, settings: Settings):
        super().__init__()
        self.store, self.ray, self.serve, self.settings = store, ray, serve, settings

    @property
    def interval_s(self) -> float:  # type: ignore[override]
        return self.settings.deploy_interval_s

    @property
    def stop_timeout_s(self) -> float:  # type: ignore[override]
        return self.settings.ray_timeout_s * 2

    def pass_failed(self, error: Exception) -> None:
        if isinstance(error, RayUnavailable):
            log.warning("deployments: Ray unavailable, retrying: %s", error)
        else:  # a bug in one pass must not end reconciliation
            super().pass_failed(error)

    # -- one pass ---------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        deployments, _ = self.store.deployments.list()
        if not deployments:
            return
        # Jobs before applications: a deploy job seen ended has finished its serve.run, so the
        # snapshot read after it lists the application (read the other way round, a deploy ending
        # in between would look like an application deleted behind the service's back).
        jobs = {d.id: (self._job(deploy_submission_id(d.id, d.deploys) if d.deploys else None),
                       self._job(delete_submission_id(d.id, d.deletes) if d.deletes else None))
                for d in deployments}
        apps = self.serve.applications()
        for d in deployments:
            deploy_job, delete_job = jobs[d.id]
            try:
                if d.status is DeploymentStatus.DELETING:
                    self._delete(d, apps.get(d.name), deploy_job, delete_job)
                elif d.status is DeploymentStatus.QUEUED:
                    continue  # not admitted: the scheduler has not booked its replicas
                else:
                    self._sync(d, apps.get(d.name), deploy_job)
            except DeploymentNotFound:
                continue  # removed by another service process meanwhile

    def _job(self, submission_id: str | None) -> RayJobView | None:
        return self.ray.status(submission_id) if submission_id else None

    def _sync(self, d: DeploymentRecord, app: AppView | None, deploy_job: RayJobView | None) -> None:
        if deploy_job is not None and not deploy_job.terminal:
            self._record(d, app, DeploymentStatus.DEPLOYING, f"deploy job {deploy_job.submission_id} {deploy_job.status}")
            return
        if app is not None and d.deploys == 0:
            if d.status is not DeploymentStatus.FAILED:
                self.store.deployments.update(d.id, status=DeploymentStatus.FAILED, message=(
                    f"Serve already runs an application named {d.name!r} that this service did not deploy; "
                    "delete this deployment and choose another name"))
            return
        if app is not None:
            status = app.status if app.status in _SERVE_STATUS else DeploymentStatus.DEPLOYING.value
            self._record(d, app, DeploymentStatus(status), app.message or None)
            return
        if d.status is DeploymentStatus.FAILED:
            return
        failures = d.failures
        if deploy_job is not None and deploy_job.status != "SUCCEEDED":
            failures += 1
            reason = (deploy_job.message or f"deploy job {deploy_job.status}")[-MESSAGE_MAX_CHARS:]
            if deploy_job.exit_code == SPEC_ERROR_EXIT_CODE:  # the spec or checkpoint is invalid
                failures = max(failures, self.settings.deploy_max_failures)
            if failures >= self.settings.deploy_max_failures:
                self.store.deployments.update(d.id, status=DeploymentStatus.FAILED, failures=failures,
                                              message=f"gave up after {failures} failed deploys: {reason}")
                return
            self.store.deployments.update(d.id, status=DeploymentStatus.DEPLOY_FAILED, failures=failures,
                                          message=f"deploy {d.deploys} failed, deploying again: {reason}")
        elif d.deploys:
            log.warning("deployments: %s (%s) is missing from Serve; deploying it again", d.id, d.name)
        self._submit_deploy(d)

    def _record(self, d: DeploymentRecord, app: AppView | None, status: DeploymentStatus, message: str | None) -> None:
        values: dict[str, Any] = {"status": status, "message": message, "checked_at": time.time(),
                                  "replicas": app.replicas if app is not None else {}}
        if status is DeploymentStatus.RUNNING:
            values["failures"] = 0
        self.store.deployments.update(d.id, **values)

    def _submit_deploy(self, d: DeploymentRecord) -> None:
        number = d.deploys + 1
        # Intent first: a crash after this line reuses the number (and Ray refuses a second copy).
        self.store.deployments.update(d.id, deploys=number, status=DeploymentStatus.DEPLOYING,
                                      message=f"submitting deploy {number}")
        spec = write_spec(self.settings, d)
        argv = [self.settings.job_python, "-m", ALLOWED_ENTRYPOINTS["serve"], "--spec", str(spec),
                "--host", self.settings.serve_host, "--port", str(self.settings.serve_port)]
        self._submit(d, deploy_submission_id(d.id, number), argv, "deploy", self._confinement(d))

    def _confinement(self, d: DeploymentRecord) -> dict[str, str]:
        """``ORCH_DATA_ROOTS`` for a non-admin team's deploy (see the module docstring); none for the
        admin team's. ``s3://`` roots and checkpoints are left out: object stores have no links."""
        return confinement_env(d.team, self.store.teams.get(d.team).roots, d.checkpoint)

    def _submit(self, d: DeploymentRecord, submission_id: str, argv: list[str], action: str,
                env: Mapping[str, str] | None = None) -> None:
        try:
            self.ray.submit(submission_id=submission_id, entrypoint=shlex.join(argv),
                            runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}},
                            metadata={"orch_deployment_id": d.id, "orch_action": action},
                            entrypoint_resources=dict(self.settings.driver_resources))
        except RayRefused as e:
            self.store.deployments.update(d.id, status=DeploymentStatus.FAILED,
                                          message=f"Ray refused the {action} job: {e}")

    def _delete(self, d: DeploymentRecord, app: AppView | None, deploy_job: RayJobView | None,
                delete_job: RayJobView | None) -> None:
        if deploy_job is not None and not deploy_job.terminal:
            self.ray.stop(deploy_job.submission_id)  # a deploy landing after the delete would revive it
            return
        if delete_job is not None and not delete_job.terminal:
            return
        if app is None or d.deploys == 0:  # gone, or never ours to delete
            self.store.deployments.remove(d.id)
            log.info("deployments: %s (%s) removed", d.id, d.name)
            return
        if d.failures >= self.settings.deploy_max_failures:
            return  # given up until a user asks to delete again (which resets the count)
        failures = d.failures + int(delete_job is not None and delete_job.status != "SUCCEEDED")
        if failures >= self.settings.deploy_max_failures:
            reason = (delete_job.message or "")[-MESSAGE_MAX_CHARS:] if delete_job else ""
            self.store.deployments.update(d.id, failures=failures, message=(
                f"delete failed {failures} times (DELETE again to retry): {reason}"))
            return
        number = d.deletes + 1
        self.store.deployments.update(d.id, deletes=number, failures=failures, message=f"deleting (job {number})")
        argv = [self.settings.job_python, "-m", ALLOWED_ENTRYPOINTS["serve"], "--delete", d.name]
        self._submit(d, delete_submission_id(d.id, number), argv, "delete")
