"""/v1/sweeps: submit a sweep, list sweeps, watch its trials, stop one trial or the whole sweep.

A sweep is a job of kind "sweep": it is created through the same path as /v1/jobs (validation, data
roots, idempotency, audit, the controller's admission: orchestrator/api/service.py), and it shows at
/v1/jobs/{id} too. Its trials come from the events its driver writes in the job's output folder
(orchestrator/sweeps.py). Another team's sweep, like a job of another kind, is a 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool

from orchestrator.api import service
from orchestrator.api.deps import (
    SWEEP_NOT_FOUND,
    ControllerDep,
    IdempotencyKey,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    VisibleSweep,
)
from orchestrator.api.schemas.base import Problem, TeamFilter
from orchestrator.api.schemas.sweeps import SweepCreate, SweepPublic, SweepsPublic, SweepSummary, TrialStop
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import JobRecord
from orchestrator.sweeps import SWEEP_KIND, TrialFinished, TrialNotFound, stop_trial, sweep_view

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

TrialId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="trial id (from the sweep's trials)")]


def _public(settings: Settings, job: JobRecord) -> SweepPublic:
    return SweepPublic.of(job, sweep_view(settings.job_root, job))


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=SweepPublic,
    responses={422: {"description": "invalid sweep spec (the field or space path is named), or a path "
                          "outside the team's data roots; nothing is stored"},
               403: {"model": Problem, "description": "a user named another team"},
               409: {"model": Problem, "description": "the Idempotency-Key was used with a different body"},
               400: {"model": Problem, "description": "the body is not decodable text"}},
)
def submit_sweep(body: SweepCreate, store: StoreDep, controller: ControllerDep, principal: PrincipalDep,
                 settings: SettingsDep, response: Response, idempotency_key: IdempotencyKey = None) -> SweepPublic:
    """Store a sweep (validated, PENDING) in the submitter's team; the controller runs its driver."""
    job, created = service.submit_job(store, controller, principal, body, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return _public(settings, job)


@router.get("", response_model=SweepsPublic)
def list_sweeps(
    store: StoreDep, settings: SettingsDep, principal: PrincipalDep,
    state: Annotated[list[JobState] | None, Query(max_length=len(JobState), description="filter by state")] = None,
    team: TeamFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> SweepsPublic:
    """Sweeps, newest first, with their trial counts and best trial."""
    jobs, count = store.jobs.list(states=state or (), limit=limit, offset=offset,
                                  team=service.listed_team(principal, team), kind=SWEEP_KIND)
    return SweepsPublic(data=[SweepSummary.of(j, sweep_view(settings.job_root, j)) for j in jobs], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic, responses=SWEEP_NOT_FOUND)
async def get_sweep(job: VisibleSweep, settings: SettingsDep) -> SweepPublic:
    """The sweep's state and its trials: parameters, state, last/best metric, step, checkpoint, error
    and each trial's metric history (one point per report, bounded)."""
    return await run_in_threadpool(_public, settings, job)


@router.post("/{sweep_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=SweepPublic,
             responses={**SWEEP_NOT_FOUND, 409: {"model": Problem, "description": "the sweep already finished"}})
def cancel_sweep(job: VisibleSweep, store: StoreDep, controller: ControllerDep, settings: SettingsDep,
                 principal: PrincipalDep) -> SweepPublic:
    """Stop the whole sweep: the job is cancelled like any job; its unfinished trials end STOPPED."""
    return _public(settings, service.cancel_job(store, controller, principal, job))


@router.post("/{sweep_id}/trials/{trial_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=TrialStop,
             responses={404: {"model": Problem, "description": "no such sweep or trial"},
                        409: {"model": Problem, "description": "the trial or the sweep already ended"}})
def stop_one_trial(job: VisibleSweep, trial_id: TrialId, store: StoreDep, settings: SettingsDep,
                   principal: PrincipalDep) -> TrialStop:
    """Ask the sweep's driver to stop one trial at its next report (within report_every steps)."""
    try:
        at = stop_trial(settings.job_root, job, trial_id, principal.user)
    except TrialNotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    except TrialFinished as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit.record(principal.user, "stop-trial", job.id, detail=trial_id, team=job.team)
    return TrialStop(sweep_id=job.id, trial_id=trial_id, requested_at=at)
