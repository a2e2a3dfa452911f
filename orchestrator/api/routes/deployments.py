"""/v1/deployments: serve a checkpoint on Ray Serve, list, inspect, delete; and
/v1/sweeps/{id}/promote: serve a sweep's best trial.

Handlers store intent only; the reconciler (orchestrator/deployments/reconciler.py) deploys and deletes on Ray
and records Serve's status, replicas and messages. Authorization is the jobs': a user creates,
sees and deletes its team's deployments only, and another team's deployment is a 404 like one that
does not exist (``_get_deployment``, the one way a handler loads one by id; a job or sweep is
loaded as the jobs routes load it, orchestrator/api/service.py); a checkpoint path must
lie under the team's data roots (the "serve" kind's ``checkpoint`` field), and a job's or sweep's
checkpoint needs the job to be visible (and the roots too when it lies outside the job's own output
folder: a spec's ``checkpoint_storage``). The bearer key is made here, answered once (201) and stored
as its SHA-256 inside the spec the replicas get. Creates and deletes go to the audit log.

A new deployment is stored QUEUED: the controller's scheduler admits its replicas against the team's
quota and the pools' free capacity (orchestrator/scheduler/service.py), and until then its message
says why it waits. One whose replicas could never fit the cluster is a 422 naming the spec field.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from jobs.contracts.training import TrainSummary
from jobs.kinds import job_kind
from jobs.specs.base import SpecError
from jobs.specs.serve import (
    KEY_BYTES,
    LimitsConfig,
    ServeSpec,
    StorageError,
    checkpoint_context,
    fit_limits,
    key_hash,
    resolve_s3_checkpoint,
)
from orchestrator.api import service
from orchestrator.api.deps import PrincipalDep, SettingsDep, StoreDep, VisibleSweep
from orchestrator.api.schemas.base import Problem, TeamFilter
from orchestrator.api.schemas.deployments import (
    DEPLOYMENT_ID_PATTERN,
    DeploymentCreate,
    DeploymentCreated,
    DeploymentPublic,
    DeploymentsPublic,
    DeploymentStats,
    PromoteCreate,
    ServeOptions,
)
from orchestrator.auth import Principal, root_error, root_violations
from orchestrator.auth.roots import S3_SCHEME
from orchestrator.controller.entrypoints import job_paths
from orchestrator.deployments.serve_status import StatsUnavailable, replica_stats, stats_key
from orchestrator.settings import Settings
from orchestrator.store import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentRecord,
    DeploymentStatus,
    JobRecord,
    Store,
    new_deployment_id,
)
from orchestrator.sweeps import sweep_view

router = APIRouter(tags=["deployments"])

DeploymentId = Annotated[str, Path(pattern=DEPLOYMENT_ID_PATTERN, description="deployment id")]
SERVING = frozenset({DeploymentStatus.RUNNING, DeploymentStatus.UNHEALTHY})  # statuses whose replicas answer
CHECKPOINT_META = "meta.json"  # what makes a folder a checkpoint (as jobs.specs.serve.resolve_checkpoint)
_NOT_FOUND = {404: {"model": Problem, "description": "no such deployment (or another team's)"}}
_CREATE_ERRORS = {
    422: {"description": "invalid spec, a checkpoint outside the team's data roots or not a checkpoint, "
                         "or replicas the cluster can never hold (the field is named); nothing is stored"},
    403: {"model": Problem, "description": "a user named another team"},
    400: {"model": Problem, "description": "the body is not decodable text"},
    404: {"model": Problem, "description": "no such job or sweep (or another team's)"},
    409: {"model": Problem, "description": "the name or route prefix is taken, or the job has not finished"},
    503: {"model": Problem, "description": "the checkpoint's s3:// bucket does not answer, refuses us or is missing"},
}


def _unprocessable(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg}])


def _get_deployment(store: Store, deployment_id: str, principal: Principal) -> DeploymentRecord:
    """The deployment, or 404 if there is none or the principal may not see it (one answer for both)."""
    try:
        d = store.deployments.get(deployment_id)
    except DeploymentNotFound:
        d = None
    if d is None or not (principal.is_admin or d.team == principal.team):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no deployment {deployment_id}")
    return d


def _pin_checkpoint(path: str, loc: tuple[str, ...]) -> str:
    """The checkpoint folder ``path`` names: itself (it holds meta.json), or the newest checkpoint of
    a run folder (``<run>/step-N`` or ``<run>/<trainer>/step-N``, as jobs.train and sweeps write
    them); an ``s3://`` prefix likewise (``_pin_s3_checkpoint``). Pinned at creation, so a redeploy
    after a restart serves the same weights. Locally two levels at most, unlike jobs.serve's
    recursive search: a request must not walk a whole file system."""
    error = root_error(path)
    if error is not None:
        raise _unprocessable(loc, error)
    if path[:len(S3_SCHEME)].lower() == S3_SCHEME:  # the data roots take S3:// too; pyarrow only s3://
        return _pin_s3_checkpoint(S3_SCHEME + path[len(S3_SCHEME):], loc)
    root = FsPath(path).resolve()
    try:
        if (root / CHECKPOINT_META).is_file():
            return str(root)
        found = [*root.glob(f"step-*/{CHECKPOINT_META}"), *root.glob(f"*/step-*/{CHECKPOINT_META}")]
    except OSError as e:  # a name too long, a folder we may not read
        raise _unprocessable(loc, f"{path!r} cannot be read: {e.strerror}") from None
    steps = [(int(m.group(1)), str(p.parent)) for p in found if (m := re.fullmatch(r"step-(\d+)", p.parent.name))]
    if not steps:
        raise _unprocessable(loc, f"{path!r} is neither a checkpoint ({CHECKPOINT_META}) nor a run folder holding one")
    return str(FsPath(max(steps)[1]).resolve())


def _pin_s3_checkpoint(uri: str, loc: tuple[str, ...]) -> str:
    """``_pin_checkpoint`` for an ``s3://`` prefix, by jobs.serve's own resolver (the prefix, or its
    newest ``step-N`` at any depth): one flat listing of the prefix, which S3 pages by a thousand
    keys, and which the team's data roots bound. No checkpoint there is the client's error (422);
    a bucket that does not answer is ours to report as upstream trouble (503, as for Ray), after the
    storage layer's bounded retries. Empty, ``.`` and ``..`` key components are refused: the data
    roots compare keys with them normalised away, S3 reads them literally (and pyarrow not at all)."""
    if any(part in ("", ".", "..") for part in uri[len(S3_SCHEME):].rstrip("/").split("/")):
        raise _unprocessable(loc, f"{uri!r}: write the s3:// key without empty, '.' or '..' components")
    try:
        return resolve_s3_checkpoint(uri)
    except SpecError as e:
        raise _unprocessable(loc, str(e).removeprefix("checkpoint: ")) from None
    except StorageError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{'.'.join(loc)}: {e}") from None


def _job_checkpoint(settings: Settings, job: JobRecord) -> tuple[str, bool]:
    """Where a finished train job's checkpoint lies, and whether that is outside the job's own
    output folder (then the team's data roots apply, as to a path a user names: the spec's
    ``checkpoint_storage`` was checked at submission, but roots may have shrunk since). In order:
    the final checkpoint its summary.json names (local or ``s3://``), else the newest under its
    spec's ``checkpoint_storage`` (a run that ended without a summary), else the newest under its
    output folder, where checkpoints go without ``checkpoint_storage``."""
    paths = job_paths(settings.job_root, job.id)
    try:
        final = TrainSummary.model_validate_json(paths.summary.read_text()).checkpoint
    except (OSError, ValueError):  # no summary: the run failed or was cancelled before writing one
        final = None
    checkpoint = final or job.spec.get("checkpoint_storage") or str(paths.out)
    if checkpoint[:len(S3_SCHEME)].lower() == S3_SCHEME:
        return checkpoint, True
    return checkpoint, not FsPath(checkpoint).resolve().is_relative_to(paths.out.resolve())


def _wake(request: Request) -> None:
    """The controller's next pass admits (or frees) the deployment's replicas, the reconciler's acts on Serve."""
    service.wake(request.app.state.controller, request.app.state.deployments)


def _check_fits(request: Request, options: ServeOptions) -> None:
    """A 422 naming the field when the replicas could never run here, even at the autoscaler's
    maximum (as a job's submit; one that fits only later is stored QUEUED and waits)."""
    controller = request.app.state.controller
    refusal = controller.scheduler.deployment_refusal(options) if controller is not None else None
    if refusal:
        loc, why = refusal
        raise _unprocessable(("spec", *loc), why)


def _check_roots(store: Store, principal: Principal, path: str, loc: tuple[str, ...]) -> None:
    if not principal.is_admin:
        problems = root_violations("serve", {"checkpoint": path}, store.teams.get(principal.team).roots)
        if problems:
            raise _unprocessable(loc, problems[0][1])


def _fit_limits(options: ServeOptions, checkpoint: str, loc: tuple[str, ...]) -> LimitsConfig:
    """The spec's limits fitted to the checkpoint's context (jobs.specs.serve.fit_limits: unset ones
    derived from it), so a deployment naming only a checkpoint never fails later on its default
    limits; a limit set that cannot fit is a 422 naming it, now rather than a FAILED deployment."""
    try:
        return fit_limits(options.limits, checkpoint_context(checkpoint))
    except SpecError as e:
        field, _, why = str(e).partition(": ")
        raise _unprocessable(loc if field == "checkpoint" else ("spec", *field.split(".")), why) from None
    except StorageError as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{'.'.join(loc)}: {e}") from None


def _create(request: Request, store: Store, settings: Settings, principal: Principal, options: ServeOptions,
            name: str | None, team: str | None, checkpoint: str, source: str, loc: tuple[str, ...],
            user_path: bool = False) -> DeploymentCreated:
    """Store a deployment of ``checkpoint`` (a folder or ``s3://`` prefix, or a run's: its newest
    checkpoint, pinned now so that a redeploy after a restart serves the same weights) with a new
    key. A ``user_path`` must lie under the team's data roots, checked before the folder is even
    looked at (no probing outside them) and again on the checkpoint found (a ``step-*`` link inside
    may point outside)."""
    team = service.acting_team(principal, team)
    _check_fits(request, options)
    if user_path:
        _check_roots(store, principal, checkpoint, loc)
    resolved = _pin_checkpoint(checkpoint, loc)
    if user_path:
        _check_roots(store, principal, resolved, loc)
    limits = _fit_limits(options, resolved, loc)
    deployment_id = new_deployment_id()
    name = name or (options.name if "name" in options.model_fields_set else deployment_id)
    key = secrets.token_urlsafe(KEY_BYTES)
    fields = options.model_dump(exclude={"name", "checkpoint", "key_sha256"})
    spec = ServeSpec.model_validate({**fields, "name": name, "checkpoint": resolved, "key_sha256": key_hash(key),
                                     "stats_key_sha256": key_hash(stats_key(settings, deployment_id)),
                                     "limits": limits.model_dump()})
    try:
        d = store.deployments.create(deployment_id=deployment_id, name=name, route_prefix=spec.prefix, team=team,
                                     owner=principal.user, spec=spec.model_dump(mode="json"), source=source)
    except DeploymentConflict as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit.record(principal.user, "deployment.create", d.id, detail=f"{name} {resolved} ({source})", team=team)
    _wake(request)
    return DeploymentCreated(**DeploymentPublic.of(d, settings.serve_base_url).model_dump(), api_key=key)


@router.post("/v1/deployments", status_code=status.HTTP_201_CREATED, response_model=DeploymentCreated,
             responses=_CREATE_ERRORS)
def create_deployment(body: DeploymentCreate, request: Request, store: StoreDep, settings: SettingsDep,
                      principal: PrincipalDep) -> DeploymentCreated:
    """Serve a checkpoint (``spec.checkpoint``: a folder or ``s3://`` prefix) or a finished training
    job's latest one (``job_id``: the one its summary names, else the newest in its checkpoint
    storage). The answer holds the bearer key, shown this once; the deployment is QUEUED until its
    replicas fit the team's quota and the cluster, then the reconciler deploys it."""
    if body.job_id is not None:
        job = service.visible_job(store, body.job_id, principal)
        if not job_kind(job.kind).servable_output:
            raise _unprocessable(("job_id",), f"job {job.id} is a {job.kind} job; serve a train job "
                                              "(a sweep's best trial: POST /v1/sweeps/{id}/promote)")
        if not job.state.terminal:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.state.value}; serve it once it "
                                                          "has finished (or serve one of its checkpoints by path)")
        checkpoint, user_path = _job_checkpoint(settings, job)
        source, loc = f"job {job.id}", ("job_id",)
    else:
        checkpoint, source, loc, user_path = body.spec.checkpoint, body.spec.checkpoint, ("spec", "checkpoint"), True
    return _create(request, store, settings, principal, body.spec, body.name, body.team, checkpoint, source, loc,
                   user_path=user_path)


@router.post("/v1/sweeps/{sweep_id}/promote", status_code=status.HTTP_201_CREATED,
             response_model=DeploymentCreated, tags=["sweeps"],
             responses={**_CREATE_ERRORS, 409: {"model": Problem, "description": (
                 "the sweep has not finished, no trial has a checkpoint, or the name is taken")}})
def promote_sweep(job: VisibleSweep, request: Request, store: StoreDep, settings: SettingsDep,
                  principal: PrincipalDep, body: PromoteCreate | None = None) -> DeploymentCreated:
    """Serve the finished sweep's best trial (by its metric, as the sweep reports ``best``)."""
    body = body or PromoteCreate()
    sweep_id = job.id
    if not job.state.terminal:
        raise HTTPException(status.HTTP_409_CONFLICT, f"sweep {sweep_id} is {job.state.value}; its best trial "
                                                      "may still change: promote it once it has finished")
    best = sweep_view(settings.job_root, job).best
    if best is None or best.checkpoint is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"sweep {sweep_id} has no trial with a checkpoint to serve")
    return _create(request, store, settings, principal, body.spec, body.name, body.team, best.checkpoint,
                   f"sweep {sweep_id} trial {best.trial_id}", ("sweep_id",))


@router.get("/v1/deployments", response_model=DeploymentsPublic)
def list_deployments(
    store: StoreDep, settings: SettingsDep, principal: PrincipalDep,
    team: TeamFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> DeploymentsPublic:
    """Deployments, newest first: a user's team's, or (admin) every team's."""
    rows, count = store.deployments.list(team=service.listed_team(principal, team), limit=limit, offset=offset)
    return DeploymentsPublic(data=[DeploymentPublic.of(d, settings.serve_base_url) for d in rows], count=count)


@router.get("/v1/deployments/{deployment_id}", response_model=DeploymentPublic, responses=_NOT_FOUND)
def get_deployment(deployment_id: DeploymentId, store: StoreDep, settings: SettingsDep,
                   principal: PrincipalDep) -> DeploymentPublic:
    """Serve's status of the application, its replicas, the checkpoint it serves and its base URL."""
    return DeploymentPublic.of(_get_deployment(store, deployment_id, principal), settings.serve_base_url)


@router.get("/v1/deployments/{deployment_id}/stats", response_model=DeploymentStats, responses={
    **_NOT_FOUND, 503: {"model": Problem, "description": "Serve did not answer, or refused the service's stats key"}})
async def deployment_stats(deployment_id: DeploymentId, store: StoreDep, settings: SettingsDep,
                           principal: PrincipalDep) -> DeploymentStats:
    """The figures of Grafana's serving row, per replica, read from its ``/v1/stats`` now: time to
    first token, time per output token and queue wait (p50/p95 over its latest rows), batch sizes,
    tokens per second over the last minute, requests by status. For the dashboard's deployment page."""
    d = await run_in_threadpool(_get_deployment, store, deployment_id, principal)
    if d.status not in SERVING:
        return DeploymentStats(id=d.id, status=d.status, replicas=[], message=f"no replica serves it yet ({d.status.value})")
    try:
        replicas = await replica_stats(settings, d)
    except StatsUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    return DeploymentStats(id=d.id, status=d.status, replicas=replicas, message=None)


@router.delete("/v1/deployments/{deployment_id}", status_code=status.HTTP_202_ACCEPTED,
               response_model=DeploymentPublic, responses=_NOT_FOUND)
def delete_deployment(deployment_id: DeploymentId, request: Request, store: StoreDep, settings: SettingsDep,
                      principal: PrincipalDep) -> DeploymentPublic:
    """Remove the application (DELETING until Serve has dropped it, then 404); the others keep serving."""
    d = _get_deployment(store, deployment_id, principal)
    try:
        d = store.deployments.request_delete(d.id)
    except DeploymentNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no deployment {deployment_id}") from None
    store.audit.record(principal.user, "deployment.delete", d.id, detail=d.name, team=d.team)
    _wake(request)
    return DeploymentPublic.of(d, settings.serve_base_url)
