"""API schemas of /v1/jobs (routes/jobs.py): create, resize, public, list."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, model_validator

from jobs.contracts.pools import POOL_NAME_PATTERN
from jobs.kinds import KINDS, AnySpec, KindName
from orchestrator.api.errors import json_safe
from orchestrator.api.schemas.base import NOT_BOOL, Name, Priority, Request, Schema
from orchestrator.states import JobState
from orchestrator.store import AttemptRecord, JobRecord, submission_id_for

MAX_RETRIES_LIMIT = 10


class JobCreate(Request):
    """A job to run: the spec (same schema as the YAML files) and control-plane options."""

    kind: KindName = "train"  # a registered job kind (jobs/kinds/)
    spec: AnySpec  # validated by the kind's spec model
    # New attempts after the driver dies for a reason outside the job (cluster restart, node loss).
    # Ray Train's own worker restarts inside one attempt are spec.resources.max_failures.
    max_retries: Annotated[int, NOT_BOOL] = Field(2, ge=0, le=MAX_RETRIES_LIMIT)
    # Queue order and preemption: a high job may stop a low one of any team when the pool is full.
    priority: Priority = "normal"
    # The job's team; only an admin may name one other than its own (403 otherwise). Default: own team.
    team: Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _spec_of_kind(cls, data: Any) -> Any:
        """The spec validated by its kind's model alone: a union would try every kind's model and
        report each one's errors under its class name; a user wants ``spec.train.steps: ...``."""
        kind = data.get("kind", "train") if isinstance(data, dict) else None
        if not isinstance(kind, str) or kind not in KINDS or "spec" not in data:
            return data  # the field validators name what is wrong with kind or spec
        try:
            spec = KINDS[data.get("kind", "train")].spec.model_validate(data["spec"])
        except ValidationError as e:
            raise ValidationError.from_exception_data(cls.__name__, [
                {"type": err["type"], "loc": ("spec", *err["loc"]), "input": err["input"],
                 **({"ctx": err["ctx"]} if "ctx" in err else {})}
                for err in e.errors()
            ]) from None
        return {**data, "spec": spec}


class ResizeWorkers(Request):
    """A training job on one pool at a new size; bounds come from the job (jobs/contracts/elastic.py)."""

    num_workers: Annotated[int, NOT_BOOL] = Field(ge=1, le=4096)


class ResizePools(Request):
    """A training job that spans pools at new worker counts for the same pools."""

    # additionalProperties: keys outside the pattern are invalid in the document too, as in pydantic.
    pools: dict[Annotated[str, Field(pattern=POOL_NAME_PATTERN)], Annotated[int, Field(ge=1, le=4096), NOT_BOOL]] = Field(
        min_length=1, max_length=16, json_schema_extra={"additionalProperties": False})


JobResize = ResizeWorkers | ResizePools


class JobEventPublic(Schema):
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: float


class AttemptPublic(Schema):
    number: int
    ray_submission_id: str
    created_at: float
    submitted_at: float | None
    ended_at: float | None
    ray_status: str | None
    ray_message: str | None
    exit_code: int | None

    @classmethod
    def of(cls, a: AttemptRecord) -> AttemptPublic:
        return cls(number=a.number, ray_submission_id=a.submission_id, created_at=a.created_at,
                   submitted_at=a.submitted_at, ended_at=a.ended_at, ray_status=a.ray_status,
                   ray_message=a.ray_message, exit_code=a.exit_code)


Metrics = dict[str, float | int | str]


class JobSummary(Schema):
    id: str
    kind: str
    name: str
    state: JobState
    message: str | None
    attempts: int
    max_retries: int
    cancel_requested: bool
    ray_submission_id: str | None
    metrics: Metrics | None
    created_at: float
    updated_at: float
    team: str
    owner: str
    priority: Priority
    preemptions: int
    resizes: int  # attempts ended by a user's resize (no retry used)
    queue_position: int | None  # 1 = next to start, while QUEUED
    queue_reason: str | None  # why it waits, while QUEUED

    @classmethod
    def of(cls, job: JobRecord) -> JobSummary:
        return cls(**_summary_fields(job))


class JobPublic(JobSummary):
    spec: dict[str, Any]
    metrics_at: float | None
    history: list[JobEventPublic]
    attempt_history: list[AttemptPublic]

    @classmethod
    def of(cls, job: JobRecord) -> JobPublic:
        return cls(
            **_summary_fields(job), spec=json_safe(job.spec), metrics_at=job.metrics_at,
            history=[JobEventPublic(from_state=e.from_state, to_state=e.to_state, reason=e.reason, at=e.at)
                     for e in job.events],
            attempt_history=[AttemptPublic.of(a) for a in job.attempt_records],
        )


def _summary_fields(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "name": job.name, "state": job.state, "message": job.message,
        "attempts": job.attempts, "max_retries": job.max_retries, "cancel_requested": job.cancel_requested,
        # Derived from the job id (list rows carry no attempt records).
        "ray_submission_id": submission_id_for(job.id, job.attempts) if job.attempts else None,
        # Workers report what they measure: a NaN loss is written back as the string "NaN".
        "metrics": json_safe(job.metrics), "created_at": job.created_at, "updated_at": job.updated_at,
        "team": job.team, "owner": job.owner, "priority": job.priority, "preemptions": job.preemptions,
        "resizes": job.resizes,
        "queue_position": job.queue_position, "queue_reason": job.queue_reason,
    }


class JobsPublic(Schema):
    data: list[JobSummary]
    count: int
