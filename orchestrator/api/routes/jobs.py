"""/v1/jobs: submit, list, inspect, cancel, resize. Handlers touch the store only; Ray is the
controller's business (a job's logs and curve, which read Ray, are routes/logs.py and routes/curves.py).

Every handler acts for a principal (``PrincipalDep``): a user sees only its team's jobs, and another
team's job is a 404 like a job that does not exist (``_get``, the one way a handler loads a job by
id); a user's job may name paths only under its team's data roots (422 naming the field).
Submissions, cancels and resizes go to the audit log."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from jobs.elastic import ResizeError, check_size, describe_size, resized, size_bounds
from jobs.kinds import KINDS, job_kind
from jobs.specs import field_errors
from orchestrator.api.deps import ControllerDep, PrincipalDep, StoreDep
from orchestrator.api.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    JOB_ID_PATTERN,
    JobCreate,
    JobPublic,
    JobResize,
    JobsPublic,
    JobSummary,
    Problem,
    ResizeWorkers,
)
from orchestrator.auth import (
    NAME_PATTERN,
    Forbidden,
    Principal,
    can_see,
    priority_refusal,
    root_violations,
    submission_team,
    visible_team,
)
from orchestrator.states import JobState
from orchestrator.store import IdempotencyConflict, JobNotFound, JobRecord, JobStore, ResizeConflict

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id")]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN,
           description="repeat a POST safely: the same key and body return the same job"),
]
_NOT_FOUND = {404: {"model": Problem, "description": "no such job (or another team's)"}}


def _get(store: JobStore, job_id: str, principal: Principal) -> JobRecord:
    """The job, or 404 if there is none or the principal may not see it (the same answer for both)."""
    try:
        job = store.get(job_id)
    except JobNotFound:
        job = None
    if job is None or not can_see(principal, job):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


def _forbidden(e: Forbidden) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, str(e))


def _check_roots(store: JobStore, principal: Principal, kind: str, spec: dict) -> None:
    """422 naming each path field of a user's spec outside its team's data roots (admins: any path)."""
    if principal.is_admin:
        return
    problems = root_violations(kind, spec, store.team(principal.team).roots)
    if problems:
        raise RequestValidationError([{"type": "data_root", "loc": _body_loc(f), "msg": m} for f, m in problems])


def _never_fits(refusal: str, loc: tuple[str, ...]) -> RequestValidationError:
    """422 for a job no pool can ever hold (even at the autoscaler's maximum), at the size's field."""
    return RequestValidationError([{"type": "capacity", "loc": loc, "msg": refusal}])


def _body_loc(field: str) -> tuple[str | int, ...]:
    """``data.source`` -> ("body", "spec", "data", "source"), as pydantic locates a spec field."""
    if field == "kind":
        return ("body", "kind")
    return ("body", "spec", *(int(p) if p.isdigit() else p for p in field.split(".")))


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
    responses={422: {"description": "invalid spec, or a path outside the team's data roots (the field is "
                          "named); nothing is stored"},
               403: {"model": Problem, "description": "a user named another team"},
               409: {"model": Problem, "description": "the Idempotency-Key was used with a different body"},
               400: {"model": Problem, "description": "the body is not decodable text"},
               413: {"model": Problem, "description": "request body over ORCH_MAX_BODY_BYTES"}},
)
def submit_job(body: JobCreate, store: StoreDep, controller: ControllerDep, principal: PrincipalDep,
               response: Response, idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Store a job (validated, PENDING) in the submitter's team; the controller hands it to Ray.
    Nothing is stored on a 422 or 403."""
    try:
        team = submission_team(principal, body.team)
    except Forbidden as e:
        raise _forbidden(e) from None
    refusal = priority_refusal(principal, store.team(team), body.priority)
    if refusal:
        store.audit(principal.user, "submit.refused", team, detail=refusal, team=team)
        raise HTTPException(status.HTTP_403_FORBIDDEN, refusal)
    if job_kind(body.kind).serves:
        raise RequestValidationError([{"type": "kind", "loc": ("body", "kind"), "msg": (
            f"{body.kind} jobs run as deployments: POST /v1/deployments (orch serve create), which keeps "
            "every team's application names and routes apart")}])
    payload = body.model_dump(mode="json")
    _check_roots(store, principal, body.kind, payload["spec"])
    # A job no pool can ever hold (even at the autoscaler's maximum) is refused, naming the shortfall.
    refusal = controller.scheduler.refusal(body.kind, payload["spec"]) if controller is not None else None
    if refusal:
        raise _never_fits(refusal, ("body", "spec", "resources"))
    # Keys are global; hashing the submitter in makes another user's key a 409, never their job.
    signed = {"request": payload, "team": team, "owner": principal.user}
    request_hash = hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()
    try:
        job, created = store.create(
            kind=body.kind, name=body.spec.name, spec=payload["spec"], max_retries=body.max_retries,
            idempotency_key=idempotency_key, request_hash=request_hash if idempotency_key else None,
            team=team, owner=principal.user, priority=body.priority,
        )
    except IdempotencyConflict as e:
        # 409, not 422: the body is valid; it conflicts with the request first made under this key.
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        return JobPublic.of(job)
    store.audit(principal.user, "submit", job.id, detail=f"{job.kind} {job.name} priority={job.priority}", team=team)
    if controller is not None:
        controller.wake()
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    state: Annotated[list[JobState] | None, Query(max_length=len(JobState), description="filter by state")] = None,
    team: Annotated[str | None, Query(pattern=NAME_PATTERN, description="filter by team (users: own team only)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobsPublic:
    """Jobs, newest first: a user's team's, or (admin) every team's."""
    try:
        team = visible_team(principal, team)
    except Forbidden as e:
        raise _forbidden(e) from None
    jobs, count = store.list(states=state or (), limit=limit, offset=offset, team=team)
    return JobsPublic(data=[JobSummary.of(j) for j in jobs], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses=_NOT_FOUND)
def get_job(job_id: JobId, store: StoreDep, principal: PrincipalDep) -> JobPublic:
    """State, state history with reasons, attempts with their Ray submission ids, latest metrics."""
    return JobPublic.of(_get(store, job_id, principal))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
             responses={**_NOT_FOUND, 409: {"model": Problem, "description": "the job already finished"}})
def cancel_job(job_id: JobId, store: StoreDep, controller: ControllerDep, principal: PrincipalDep) -> JobPublic:
    """Request cancellation; the controller stops the Ray job and moves the job to CANCELLED."""
    before = _get(store, job_id, principal)
    job = store.request_cancel(job_id)  # a job is never deleted: it still exists
    if job.state.terminal and job.state is not JobState.CANCELLED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.state.value}")
    if job.cancel_requested and not before.cancel_requested:
        store.audit(principal.user, "cancel", job_id, detail=f"in state {job.state.value}", team=job.team)
    if controller is not None:
        controller.wake()
    return JobPublic.of(job)


@router.patch(
    "/{job_id}", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
    responses={**_NOT_FOUND,
               409: {"model": Problem, "description": "the job is starting, retrying, preempting or finished"},
               422: {"description": "a size out of the job's bounds (named) or not a multiple of "
                                    "resources.expert_parallel, a job of a kind that cannot be resized, or a size "
                                    "the cluster can never hold"},
               400: {"model": Problem, "description": "the body is not decodable text"},
               413: {"model": Problem, "description": "request body over ORCH_MAX_BODY_BYTES"}},
)
def resize_job(job_id: JobId, store: StoreDep, controller: ControllerDep, principal: PrincipalDep,
               body: JobResize | None = None) -> JobPublic:
    """Resize a training job. A RUNNING job checkpoints now, stops, and restarts at the new size from
    that checkpoint (RESIZING, then QUEUED for the scheduler); a job not started yet just takes the new
    size. No retry is used up. Without a body nothing changes."""
    job = _get(store, job_id, principal)
    if body is None:
        return JobPublic.of(job)
    workers, pools = (body.num_workers, None) if isinstance(body, ResizeWorkers) else (None, body.pools)
    field = "num_workers" if workers is not None else "pools"
    kind = job_kind(job.kind)
    if not kind.resizable:
        resizable = ", ".join(k.name for k in KINDS.values() if k.resizable)
        raise RequestValidationError([{"type": "resize", "loc": ("body", field),
                                       "msg": f"{job.kind} jobs cannot be resized (only {resizable} jobs)"}])
    spec = kind.spec.model_validate(job.spec)
    scheduler = controller.scheduler if controller is not None else None
    try:
        raw, total = resized(job.spec, spec, num_workers=workers, pools=pools)
        check_size(spec, total, size_bounds(spec, scheduler.largest_size(spec) if scheduler else None), field)
        new_spec = kind.spec.model_validate(raw).model_dump(mode="json")
    except ResizeError as e:
        raise RequestValidationError([{"type": "resize", "loc": ("body", e.field), "msg": str(e)}]) from None
    except ValidationError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "; ".join(field_errors(e.errors()))) from None
    refusal = scheduler.refusal(job.kind, new_spec) if scheduler else None
    if refusal:
        raise _never_fits(refusal, ("body", field))
    try:
        job = store.request_resize(job_id, new_spec)
    except ResizeConflict as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit(principal.user, "resize", job_id, detail=f"to {describe_size(new_spec)} in state {job.state.value}",
                team=job.team)
    if controller is not None:
        controller.wake()
    return JobPublic.of(job)
