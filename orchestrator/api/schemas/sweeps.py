"""API schemas of /v1/sweeps (orchestrator/api/routes/sweeps.py): a sweep is a job of kind "sweep"
(created like one, JobCreate's rules) plus its trials as its driver's events tell them
(orchestrator/sweeps.py). One family: create / public / list, and a trial stop's answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from jobs.contracts.sweep_events import HISTORY_MAX_POINTS, SweepView, TrialState
from jobs.specs.sweep import SweepSpec
from orchestrator.api.errors import json_safe
from orchestrator.api.schemas.base import Schema
from orchestrator.api.schemas.jobs import JobCreate
from orchestrator.states import JobState
from orchestrator.store import JobRecord
from orchestrator.sweeps import trials_total


class SweepCreate(JobCreate):
    """A sweep to run: the SweepSpec (same schema as jobs/examples/sweep.yaml) and the job options."""

    kind: Literal["sweep"] = "sweep"
    spec: SweepSpec

    @model_validator(mode="before")
    @classmethod
    def _kind_sweep(cls, data: Any) -> Any:
        """The kind JobCreate's validators read, when the body leaves it out (they run after this one)."""
        return {"kind": "sweep", **data} if isinstance(data, dict) else data


class TrialPublic(Schema):
    id: str
    state: TrialState
    parameters: dict[str, Any]  # spec field path -> this trial's value
    iteration: int  # reports so far
    step: int
    total_steps: int
    last_metric: float | None  # the sweep's metric at the latest report
    best_metric: float | None
    eval_loss: float | None
    compression: float | None  # dense bytes / bytes sent at the latest report (the trial's byte saving)
    checkpoint: str | None  # the latest checkpoint folder
    error: str | None
    stop_requested: bool
    started_at: float | None
    ended_at: float | None
    history: list[dict[str, float]]  # one point per report ({step, loss[, eval_loss]}), thinned


class BestTrial(Schema):
    trial_id: str
    value: float
    step: int
    checkpoint: str | None
    parameters: dict[str, Any]


class SweepSummary(Schema):
    id: str
    name: str
    state: JobState
    message: str | None
    team: str
    owner: str
    created_at: float
    updated_at: float
    cancel_requested: bool
    metric: str
    mode: str
    trials_total: int
    counts: dict[TrialState, int]
    best: BestTrial | None

    @classmethod
    def fields_of(cls, job: JobRecord, view: SweepView) -> dict[str, Any]:
        return {"id": job.id, "name": job.name, "state": job.state, "message": job.message, "team": job.team,
                "owner": job.owner, "created_at": job.created_at, "updated_at": job.updated_at,
                "cancel_requested": job.cancel_requested, "metric": view.metric, "mode": view.mode,
                "trials_total": trials_total(job.spec), "counts": view.counts,
                "best": view.best.model_dump() if view.best else None}

    @classmethod
    def of(cls, job: JobRecord, view: SweepView) -> SweepSummary:
        return cls(**cls.fields_of(job, view))


class SweepPublic(SweepSummary):
    search: str
    scheduler: str
    spec: dict[str, Any]
    trials: list[TrialPublic]  # in start order
    history_max_points: int

    @classmethod
    def of(cls, job: JobRecord, view: SweepView) -> SweepPublic:
        spec = json_safe(job.spec)
        return cls(**cls.fields_of(job, view), search=spec.get("search", "random"),
                   scheduler=(spec.get("scheduler") or {}).get("type", "fifo"), spec=spec,
                   trials=[TrialPublic.model_validate(t.model_dump()) for t in view.trials],
                   history_max_points=HISTORY_MAX_POINTS)


class SweepsPublic(Schema):
    data: list[SweepSummary]
    count: int


class TrialStop(Schema):
    sweep_id: str
    trial_id: str
    requested_at: float
