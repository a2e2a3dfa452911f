"""/v1/deployments: serve a checkpoint on Ray Serve, list, inspect, delete; and
/v1/sweeps/{id}/promote: serve a sweep's best trial.

Handlers store intent only; the reconciler (orchestrator/deployments.py) deploys and deletes on Ray
and records Serve's status, replicas and messages. Authorization is the jobs': a user creates,
sees and deletes its team's deployments only, and another team's deployment is a 404 like one that
does not exist (``_get_deployment``, the one way a handler loads one by id); a checkpoint path must
lie under the team's data roots (the "serve" kind's ``checkpoint`` field), and a job's or sweep's
checkpoint needs the job to be visible. The bearer key is made here, answered once (201) and stored
as its SHA-256 inside the spec the replicas get. Creates and deletes go to the audit log.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError

from jobs.serve import KEY_BYTES, key_hash
from jobs.serve_spec import ServeSpec
from orchestrator.api.deployment_schemas import (
    DEPLOYMENT_ID_PATTERN,
    DeploymentCreate,
    DeploymentCreated,
    DeploymentPublic,
    DeploymentsPublic,
    PromoteCreate,
    ServeOptions,
)
from orchestrator.api.deps import PrincipalDep, SettingsDep, StoreDep
from orchestrator.api.routes.jobs import _forbidden, _get
from orchestrator.api.routes.sweeps import SweepId, _get_sweep
from orchestrator.api.schemas import Problem
from orchestrator.auth import (
    NAME_PATTERN,
    Forbidden,
    Principal,
    root_error,
    root_violations,
    submission_team,
    visible_team,
)
from orchestrator.entrypoints import job_paths
from orchestrator.settings import Settings
from orchestrator.store import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentRecord,
    JobStore,
    new_deployment_id,
)
from orchestrator.sweeps import sweep_view

router = APIRouter(tags=["deployments"])

DeploymentId = Annotated[str, Path(pattern=DEPLOYMENT_ID_PATTERN, description="deployment id")]
CHECKPOINT_META = "meta.json"  # what makes a folder a checkpoint (as jobs.serve.resolve_checkpoint)
TRAIN_KIND = "train"  # the job kind whose output a job_id deployment serves (a sweep: promote)
_NOT_FOUND = {404: {"model": Problem, "description": "no such deployment (or another team's)"}}
_CREATE_ERRORS = {
    422: {"description": "invalid spec, a checkpoint outside the team's data roots or not a checkpoint "
                         "(the field is named); nothing is stored"},
    403: {"model": Problem, "description": "a user named another team"},
    400: {"model": Problem, "description": "the body is not decodable text"},
    404: {"model": Problem, "description": "no such job or sweep (or another team's)"},
    409: {"model": Problem, "description": "the name or route prefix is taken, or the job has not finished"},
}


def _unprocessable(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg}])


def _get_deployment(store: JobStore, deployment_id: str, principal: Principal) -> DeploymentRecord:
    """The deployment, or 404 if there is none or the principal may not see it (one answer for both)."""
    try:
        d = store.deployment(deployment_id)
    except DeploymentNotFound:
        d = None
    if d is None or not (principal.is_admin or d.team == principal.team):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no deployment {deployment_id}")
    return d


def _pin_checkpoint(path: str, loc: tuple[str, ...]) -> Path:
    """The checkpoint folder ``path`` names: itself (it holds meta.json), or the newest checkpoint of
    a run folder (``<run>/step-N`` or ``<run>/<trainer>/step-N``, as jobs.train and sweeps write
    them). Pinned at creation, so a redeploy after a restart serves the same weights. Two levels at
    most, unlike jobs.serve's recursive search: a request must not walk a whole file system."""
    error = root_error(path)
    if error is not None:
        raise _unprocessable(loc, error)
    root = FsPath(path).resolve()
    try:
        if (root / CHECKPOINT_META).is_file():
            return root
        found = [*root.glob(f"step-*/{CHECKPOINT_META}"), *root.glob(f"*/step-*/{CHECKPOINT_META}")]
    except OSError as e:  # a name too long, a folder we may not read
        raise _unprocessable(loc, f"{path!r} cannot be read: {e.strerror}") from None
    steps = [(int(m.group(1)), str(p.parent)) for p in found if (m := re.fullmatch(r"step-(\d+)", p.parent.name))]
    if not steps:
        raise _unprocessable(loc, f"{path!r} is neither a checkpoint ({CHECKPOINT_META}) nor a run folder holding one")
    return FsPath(max(steps)[1]).resolve()


def _wake(request: Request) -> None:
    reconciler = request.app.state.deployments
    if reconciler is not None:
        reconciler.wake()


def _check_roots(store: JobStore, principal: Principal, path: str, loc: tuple[str, ...]) -> None:
    if not principal.is_admin:
        problems = root_violations("serve", {"checkpoint": path}, store.team(principal.team).roots)
        if problems:
            raise _unprocessable(loc, problems[0][1])


def _create(request: Request, store: JobStore, settings: Settings, principal: Principal, options: ServeOptions,
            name: str | None, team: str | None, checkpoint: str, source: str, loc: tuple[str, ...],
            user_path: bool = False) -> DeploymentCreated:
    """Store a deployment of ``checkpoint`` (a folder, or a run folder: its newest checkpoint, pinned
    now so that a redeploy after a restart serves the same weights) with a new key. A ``user_path``
    must lie under the team's data roots, checked before the folder is even looked at (no probing
    outside them) and again on the checkpoint found (a ``step-*`` link inside may point outside)."""
    try:
        team = submission_team(principal, team)
    except Forbidden as e:
        raise _forbidden(e) from None
    if user_path:
        _check_roots(store, principal, checkpoint, loc)
    resolved = str(_pin_checkpoint(checkpoint, loc))
    if user_path:
        _check_roots(store, principal, resolved, loc)
    deployment_id = new_deployment_id()
    name = name or (options.name if "name" in options.model_fields_set else deployment_id)
    key = secrets.token_urlsafe(KEY_BYTES)
    fields = options.model_dump(exclude={"name", "checkpoint", "key_sha256"})
    spec = ServeSpec.model_validate({**fields, "name": name, "checkpoint": resolved, "key_sha256": key_hash(key)})
    try:
        d = store.create_deployment(deployment_id=deployment_id, name=name, route_prefix=spec.prefix, team=team,
                                    owner=principal.user, spec=spec.model_dump(mode="json"), source=source)
    except DeploymentConflict as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit(principal.user, "deployment.create", d.id, detail=f"{name} {resolved} ({source})", team=team)
    _wake(request)
    return DeploymentCreated(**DeploymentPublic.of(d, settings.serve_base_url).model_dump(), api_key=key)


@router.post("/v1/deployments", status_code=status.HTTP_201_CREATED, response_model=DeploymentCreated,
             responses=_CREATE_ERRORS)
def create_deployment(body: DeploymentCreate, request: Request, store: StoreDep, settings: SettingsDep,
                      principal: PrincipalDep) -> DeploymentCreated:
    """Serve a checkpoint (``spec.checkpoint``) or a finished training job's latest one (``job_id``).
    The answer holds the bearer key, shown this once; the reconciler deploys within moments."""
    if body.job_id is not None:
        job = _get(store, body.job_id, principal)
        if job.kind != TRAIN_KIND:
            raise _unprocessable(("job_id",), f"job {job.id} is a {job.kind} job; serve a train job "
                                              "(a sweep's best trial: POST /v1/sweeps/{id}/promote)")
        if not job.state.terminal:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.state.value}; serve it once it "
                                                          "has finished (or serve one of its checkpoints by path)")
        checkpoint, source, loc = str(job_paths(settings.job_root, job.id).out), f"job {job.id}", ("job_id",)
    else:
        checkpoint, source, loc = body.spec.checkpoint, body.spec.checkpoint, ("spec", "checkpoint")
    return _create(request, store, settings, principal, body.spec, body.name, body.team, checkpoint, source, loc,
                   user_path=body.job_id is None)


@router.post("/v1/sweeps/{sweep_id}/promote", status_code=status.HTTP_201_CREATED,
             response_model=DeploymentCreated, tags=["sweeps"],
             responses={**_CREATE_ERRORS, 409: {"model": Problem, "description": (
                 "the sweep has not finished, no trial has a checkpoint, or the name is taken")}})
def promote_sweep(sweep_id: SweepId, request: Request, store: StoreDep, settings: SettingsDep,
                  principal: PrincipalDep, body: PromoteCreate | None = None) -> DeploymentCreated:
    """Serve the finished sweep's best trial (by its metric, as the sweep reports ``best``)."""
    body = body or PromoteCreate()
    job = _get_sweep(store, sweep_id, principal)
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
    team: Annotated[str | None, Query(pattern=NAME_PATTERN, description="filter by team (users: own team only)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> DeploymentsPublic:
    """Deployments, newest first: a user's team's, or (admin) every team's."""
    try:
        team = visible_team(principal, team)
    except Forbidden as e:
        raise _forbidden(e) from None
    rows, count = store.deployments(team=team, limit=limit, offset=offset)
    return DeploymentsPublic(data=[DeploymentPublic.of(d, settings.serve_base_url) for d in rows], count=count)


@router.get("/v1/deployments/{deployment_id}", response_model=DeploymentPublic, responses=_NOT_FOUND)
def get_deployment(deployment_id: DeploymentId, store: StoreDep, settings: SettingsDep,
                   principal: PrincipalDep) -> DeploymentPublic:
    """Serve's status of the application, its replicas, the checkpoint it serves and its base URL."""
    return DeploymentPublic.of(_get_deployment(store, deployment_id, principal), settings.serve_base_url)


@router.delete("/v1/deployments/{deployment_id}", status_code=status.HTTP_202_ACCEPTED,
               response_model=DeploymentPublic, responses=_NOT_FOUND)
def delete_deployment(deployment_id: DeploymentId, request: Request, store: StoreDep, settings: SettingsDep,
                      principal: PrincipalDep) -> DeploymentPublic:
    """Remove the application (DELETING until Serve has dropped it, then 404); the others keep serving."""
    d = _get_deployment(store, deployment_id, principal)
    try:
        d = store.request_deployment_delete(d.id)
    except DeploymentNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no deployment {deployment_id}") from None
    store.audit(principal.user, "deployment.delete", d.id, detail=d.name, team=d.team)
    _wake(request)
    return DeploymentPublic.of(d, settings.serve_base_url)
