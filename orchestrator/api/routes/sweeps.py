"""/v1/sweeps: submit a sweep, list sweeps, watch its trials, stop one trial or the whole sweep.

A sweep is a job of kind "sweep": it is created through the same path as /v1/jobs (validation, data
roots, idempotency, audit, the controller's admission: routes/jobs.py's handlers do it), and it shows
at /v1/jobs/{id} too. Its trials come from the events its driver writes in the job's output folder
(orchestrator/sweeps.py). Another team's sweep, like a job of another kind, is a 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool

from orchestrator.api.deps import ControllerDep, PrincipalDep, SettingsDep, StoreDep
from orchestrator.api.routes.jobs import IdempotencyKey, _forbidden, _get, cancel_job, submit_job
from orchestrator.api.schemas import JOB_ID_PATTERN, Problem
from orchestrator.api.sweep_schemas import SweepCreate, SweepPublic, SweepsPublic, SweepSummary, TrialStop
from orchestrator.auth import NAME_PATTERN, Forbidden, Principal, visible_team
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import JobRecord, JobStore
from orchestrator.sweeps import SWEEP_KIND, TrialFinished, TrialNotFound, stop_trial, sweep_view

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

SweepId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the sweep's id (a job id)")]
TrialId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="trial id (from the sweep's trials)")]
_NOT_FOUND = {404: {"model": Problem, "description": "no such sweep (or another team's, or not a sweep)"}}


def _get_sweep(store: JobStore, job_id: str, principal: Principal) -> JobRecord:
    job = _get(store, job_id, principal)
    if job.kind != SWEEP_KIND:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sweep {job_id} (job {job_id} is a {job.kind} job)")
    return job


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
    job = submit_job(body, store, controller, principal, response, idempotency_key)
    return _public(settings, store.get(job.id))


@router.get("", response_model=SweepsPublic)
def list_sweeps(
    store: StoreDep, settings: SettingsDep, principal: PrincipalDep,
    state: Annotated[list[JobState] | None, Query(max_length=len(JobState), description="filter by state")] = None,
    team: Annotated[str | None, Query(pattern=NAME_PATTERN, description="filter by team (users: own team only)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> SweepsPublic:
    """Sweeps, newest first, with their trial counts and best trial."""
    try:
        team = visible_team(principal, team)
    except Forbidden as e:
        raise _forbidden(e) from None
    jobs, count = store.list(states=state or (), limit=limit, offset=offset, team=team, kind=SWEEP_KIND)
    return SweepsPublic(data=[SweepSummary.of(j, sweep_view(settings.job_root, j)) for j in jobs], count=count)


@router.get("/{sweep_id}", response_model=SweepPublic, responses=_NOT_FOUND)
async def get_sweep(sweep_id: SweepId, store: StoreDep, settings: SettingsDep, principal: PrincipalDep) -> SweepPublic:
    """The sweep's state and its trials: parameters, state, last/best metric, step, checkpoint, error
    and each trial's metric history (one point per report, bounded)."""
    job = await run_in_threadpool(_get_sweep, store, sweep_id, principal)
    return await run_in_threadpool(_public, settings, job)


@router.post("/{sweep_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=SweepPublic,
             responses={**_NOT_FOUND, 409: {"model": Problem, "description": "the sweep already finished"}})
def cancel_sweep(sweep_id: SweepId, store: StoreDep, controller: ControllerDep, settings: SettingsDep,
                 principal: PrincipalDep) -> SweepPublic:
    """Stop the whole sweep: the job is cancelled like any job; its unfinished trials end STOPPED."""
    _get_sweep(store, sweep_id, principal)
    cancel_job(sweep_id, store, controller, principal)
    return _public(settings, store.get(sweep_id))


@router.post("/{sweep_id}/trials/{trial_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=TrialStop,
             responses={404: {"model": Problem, "description": "no such sweep or trial"},
                        409: {"model": Problem, "description": "the trial or the sweep already ended"}})
def stop_one_trial(sweep_id: SweepId, trial_id: TrialId, store: StoreDep, settings: SettingsDep,
                   principal: PrincipalDep) -> TrialStop:
    """Ask the sweep's driver to stop one trial at its next report (within report_every steps)."""
    job = _get_sweep(store, sweep_id, principal)
    try:
        at = stop_trial(settings.job_root, job, trial_id, principal.user)
    except TrialNotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    except TrialFinished as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    store.audit(principal.user, "stop-trial", sweep_id, detail=trial_id, team=job.team)
    return TrialStop(sweep_id=sweep_id, trial_id=trial_id, requested_at=at)
