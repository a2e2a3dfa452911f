"""API schemas, one family per resource (create / public / list), bounded; never storage rows."""

from __future__ import annotations

from itertools import islice
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from jobs.kinds import KINDS, AnySpec, KindName
from jobs.specs import DeviceKind
from orchestrator.api.errors import MAX_REPORTED_ERRORS, json_safe, unencodable
from orchestrator.states import JobState
from orchestrator.store import AttemptRecord, JobRecord, submission_id_for

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Printable ASCII without spaces, as in the IETF Idempotency-Key draft's examples.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
MAX_RETRIES_LIMIT = 10


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- jobs ------------------------------------------------------------------------------------------


_SURROGATE_ERROR = PydanticCustomError(
    "string_surrogate", "String should not hold a lone UTF-16 surrogate (it has no UTF-8 encoding)")


class JobCreate(_Schema):
    """A job to run: the spec (same schema as the YAML files) and control-plane options."""

    kind: KindName = "train"  # a registered job kind (jobs/kinds.py)
    spec: AnySpec  # validated by the kind's spec model
    # New attempts after the driver dies for a reason outside the job (cluster restart, node loss).
    # Ray Train's own worker restarts inside one attempt are spec.resources.max_failures.
    max_retries: int = Field(2, ge=0, le=MAX_RETRIES_LIMIT)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """Every string valid Unicode and every number finite, anywhere in the body: checked on the
        decoded JSON before the fields, so that a value that could be neither stored nor echoed (see
        errors.py) is a 422 at its own location, even in a field that takes any string."""
        errors: list[InitErrorDetails] = [
            {"type": _SURROGATE_ERROR if kind == "surrogate" else "finite_number", "loc": loc, "input": value}
            for loc, kind, value in islice(unencodable(data), MAX_REPORTED_ERRORS)
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _spec_of_kind(self) -> JobCreate:
        expected = KINDS[self.kind].spec
        if not isinstance(self.spec, expected):
            raise ValueError(f"spec is not a {self.kind} spec ({expected.__name__})")
        return self


class JobEventPublic(_Schema):
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: float


class AttemptPublic(_Schema):
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


class JobSummary(_Schema):
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
    }


class JobsPublic(_Schema):
    data: list[JobSummary]
    count: int


class JobLogs(_Schema):
    job_id: str
    attempt: int | None
    ray_submission_id: str | None
    logs: str


# -- cluster ---------------------------------------------------------------------------------------


class NodePublic(_Schema):
    node_id: str
    ip: str
    is_head: bool
    state: str
    kind: DeviceKind  # the node's pool, in the specs' device vocabulary
    resources: dict[str, float]


class KindPublic(_Schema):
    nodes: int
    resources: dict[str, float]


class ClusterPublic(_Schema):
    ray_address: str | None
    alive_nodes: int
    totals: dict[str, float]
    by_kind: dict[str, KindPublic]
    nodes: list[NodePublic]


# -- service ---------------------------------------------------------------------------------------


class Health(_Schema):
    status: Literal["ok"]


class Problem(_Schema):
    detail: str

