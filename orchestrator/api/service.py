"""What the API does to jobs, beyond reading a request: the one way to load a job a principal may see,
the team a request acts in, submit, cancel and resize (each audited), and waking the reconcile loops.
Route handlers (routes/jobs.py, sweeps.py, deployments.py, logs.py, curves.py) call these and never
each other. The answers are HTTP errors, as a handler would raise them: a 404 for a job of another
team (the same answer as for no job), a 403 for a team a user may not name, a 422 naming the field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from jobs.contracts.elastic import ResizeError, check_size, describe_size, resized, size_bounds
from jobs.kinds import KINDS, job_kind
from jobs.specs.base import field_errors
from orchestrator.api.schemas.jobs import JobCreate, JobResize, ResizeWorkers
from orchestrator.auth import (
    Forbidden,
    Principal,
    can_see,
    priority_refusal,
    root_violations,
    submission_team,
    visible_team,
)
from orchestrator.controller.loop import Controller
from orchestrator.states import JobState
from orchestrator.store import IdempotencyConflict, JobNotFound, JobRecord, ResizeConflict, Store
from orchestrator.sweeps import SWEEP_KIND


class Wakeable(Protocol):
    def wake(self) -> None: ...


def wake(*loops: Wakeable | None) -> None:
    """Run each loop's next pass now (the controller admits, the deployment reconciler acts on Serve)."""
    for loop in loops:
        if loop is not None:
            loop.wake()


# -- who may see and act ---------------------------------------------------------------------------


def visible_job(store: Store, job_id: str, principal: Principal) -> JobRecord:
    """The job, or 404 if there is none or the principal may not see it (the same answer for both)."""
    try:
        job = store.jobs.get(job_id)
    except JobNotFound:
        job = None
    if job is None or not can_see(principal, job):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


def visible_sweep(store: Store, job_id: str, principal: Principal) -> JobRecord:
    """``visible_job``, and 404 too for a job of another kind."""
    job = visible_job(store, job_id, principal)
    if job.kind != SWEEP_KIND:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sweep {job_id} (job {job_id} is a {job.kind} job)")
    return job


def acting_team(principal: Principal, team: str | None) -> str:
    """The team a new job or deployment belongs to: the principal's own, or (admins only) the one named."""
    try:
        return submission_team(principal, team)
    except Forbidden as e:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(e)) from None


def listed_team(principal: Principal, team: str | None) -> str | None:
    """The team a list shows: a user's own (naming another is a 403), or (admins) the one named or all."""
    try:
        return visible_team(principal, team)
    except Forbidden as e:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(e)) from None


# -- submit, cancel, resize ------------------------------------------------------------------------


def _body_loc(field: str) -> tuple[str | int, ...]:
    """``data.source`` -> ("body", "spec", "data", "source"), as pydantic locates a spec field."""
    if field == "kind":
        return ("body", "kind")
    return ("body", "spec", *(int(p) if p.isdigit() else p for p in field.split(".")))


def _check_roots(store: Store, principal: Principal, kind: str, spec: dict) -> None:
    """422 naming each path field of a user's spec outside its team's data roots (admins: any path)."""
    if principal.is_admin:
        return
    problems = root_violations(kind, spec, store.teams.get(principal.team).roots)
    if problems:
        raise RequestValidationError([{"type": "data_root", "loc": _body_loc(f), "msg": m} for f, m in problems])


def _never_fits(refusal: str, loc: tuple[str, ...]) -> RequestValidationError:
    """422 for a job no pool can ever hold (even at the autoscaler's maximum), at the size's field."""
    return RequestValidationError([{"type": "capacity", "loc": loc, "msg": refusal}])


def submit_job(store: Store, controller: Controller | None, principal: Principal, body: JobCreate,
               idempotency_key: str | None) -> tuple[JobRecord, bool]:
    """Store a job (validated, PENDING) in the submitter's team and wake the controller; the job and
    whether it is new (False: the Idempotency-Key's earlier job). Nothing is stored on a 422 or 403."""
    team = acting_team(principal, body.team)
    refusal = priority_refusal(principal, store.teams.get(team), body.priority)
    if refusal:
        store.audit.record(principal.user, "submit.refused", team, detail=refusal, team=team)
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
        job, created = store.jobs.create(
            kind=body.kind, name=body.spec.name, spec=payload["spec"], max_retries=body.max_retries,
            idempotency_key=idempotency_key, request_hash=request_hash if idempotency_key else None,
            team=team, owner=principal.user, priority=body.priority,
        )
    except IdempotencyConflict as e:
        # 409, not 422: the body is valid; it conflicts with the request first made under this key.
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    if created:
        store.audit.record(principal.user, "submit", job.id, detail=f"{job.kind} {job.name} priority={job.priority}",
                           team=team)
        wake(controller)
    return job, created


def cancel_job(store: Store, controller: Controller | None, principal: Principal, job: JobRecord) -> JobRecord:
    """Ask for a visible job's cancellation (409 if it already finished otherwise); the controller stops it."""
    cancelled = store.jobs.request_cancel(job.id)  # a job is never deleted: it still exists
    if cancelled.state.terminal and cancelled.state is not JobState.CANCELLED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already {cancelled.state.value}")
    if cancelled.cancel_requested and not job.cancel_requested:
        store.audit.record(principal.user, "cancel", job.id, detail=f"in state {cancelled.state.value}",
                           team=cancelled.team)
    wake(controller)
    return cancelled


def resize_job(store: Store, controller: Controller | None, principal: Principal, job: JobRecord,
               body: JobResize) -> JobRecord:
    """Store a visible training job's new size (422 naming the field for a size out of its bounds or
    one the cluster can never hold, 409 for a job that cannot take it now); the controller restarts it."""
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
        job = store.jobs.request_resize(job.id, new_spec)
    except ResizeConflict as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit.record(principal.user, "resize", job.id,
                       detail=f"to {describe_size(new_spec)} in state {job.state.value}", team=job.team)
    wake(controller)
    return job
