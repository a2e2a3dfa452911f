"""/v1/jobs: submit, list, inspect, cancel, resize. Handlers touch the store only, through the service
layer (orchestrator/api/service.py); Ray is the controller's business (a job's logs and curve, which
read Ray, are routes/logs.py and routes/curves.py).

Every handler acts for a principal (``PrincipalDep``): a user sees only its team's jobs, and another
team's job is a 404 like a job that does not exist (``VisibleJob``, the one way a handler loads a job
by id); a user's job may name paths only under its team's data roots (422 naming the field).
Submissions, cancels and resizes go to the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from orchestrator.api import service
from orchestrator.api.deps import (
    JOB_NOT_FOUND,
    ControllerDep,
    IdempotencyKey,
    PrincipalDep,
    StoreDep,
    VisibleJob,
)
from orchestrator.api.schemas.base import Problem, TeamFilter
from orchestrator.api.schemas.jobs import JobCreate, JobPublic, JobResize, JobsPublic, JobSummary
from orchestrator.states import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


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
    job, created = service.submit_job(store, controller, principal, body, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    state: Annotated[list[JobState] | None, Query(max_length=len(JobState), description="filter by state")] = None,
    team: TeamFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobsPublic:
    """Jobs, newest first: a user's team's, or (admin) every team's."""
    jobs, count = store.jobs.list(states=state or (), limit=limit, offset=offset,
                                  team=service.listed_team(principal, team))
    return JobsPublic(data=[JobSummary.of(j) for j in jobs], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses=JOB_NOT_FOUND)
def get_job(job: VisibleJob) -> JobPublic:
    """State, state history with reasons, attempts with their Ray submission ids, latest metrics."""
    return JobPublic.of(job)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
             responses={**JOB_NOT_FOUND, 409: {"model": Problem, "description": "the job already finished"}})
def cancel_job(job: VisibleJob, store: StoreDep, controller: ControllerDep, principal: PrincipalDep) -> JobPublic:
    """Request cancellation; the controller stops the Ray job and moves the job to CANCELLED."""
    return JobPublic.of(service.cancel_job(store, controller, principal, job))


@router.patch(
    "/{job_id}", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
    responses={**JOB_NOT_FOUND,
               409: {"model": Problem, "description": "the job is starting, retrying, preempting or finished"},
               422: {"description": "a size out of the job's bounds (named) or not a multiple of "
                                    "resources.expert_parallel, a job of a kind that cannot be resized, or a size "
                                    "the cluster can never hold"},
               400: {"model": Problem, "description": "the body is not decodable text"},
               413: {"model": Problem, "description": "request body over ORCH_MAX_BODY_BYTES"}},
)
def resize_job(job: VisibleJob, store: StoreDep, controller: ControllerDep, principal: PrincipalDep,
               body: JobResize | None = None) -> JobPublic:
    """Resize a training job. A RUNNING job checkpoints now, stops, and restarts at the new size from
    that checkpoint (RESIZING, then QUEUED for the scheduler); a job not started yet just takes the new
    size. No retry is used up. Without a body nothing changes."""
    if body is None:
        return JobPublic.of(job)
    return JobPublic.of(service.resize_job(store, controller, principal, job, body))
