"""API schemas, one family per resource (create / public / list), bounded; never storage rows."""

from __future__ import annotations

from itertools import islice
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from jobs.kinds import KINDS, AnySpec, KindName
from jobs.pools import POOL_NAME_PATTERN
from jobs.specs import Device
from orchestrator.api.errors import MAX_REPORTED_ERRORS, json_safe, unencodable
from orchestrator.auth import NAME_PATTERN, Role, root_error
from orchestrator.auth.roots import ROOT_PATTERN
from orchestrator.states import JobState
from orchestrator.store import (
    AttemptRecord,
    AuditRecord,
    JobRecord,
    TeamRecord,
    TokenRecord,
    submission_id_for,
)

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TOKEN_ID_PATTERN = r"^tok_[0-9a-f]{1,32}$"
# Printable ASCII without spaces, as in the IETF Idempotency-Key draft's examples.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
MAX_RETRIES_LIMIT = 10


Priority = Literal["low", "normal", "high"]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# On an int field: pydantic's lax mode reads false as 0; strict mode refuses 8.0, which JSON
# Schema's "integer" allows. Only the boolean is refused.
NOT_BOOL = BeforeValidator(_not_bool)
TeamName = Annotated[str, Field(pattern=NAME_PATTERN)]
UserName = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- jobs ------------------------------------------------------------------------------------------


_SURROGATE_ERROR = PydanticCustomError(
    "string_surrogate", "String should not hold a lone UTF-16 surrogate (it has no UTF-8 encoding)")


class JobCreate(_Schema):
    """A job to run: the spec (same schema as the YAML files) and control-plane options."""

    kind: KindName = "train"  # a registered job kind (jobs/kinds/)
    spec: AnySpec  # validated by the kind's spec model
    # New attempts after the driver dies for a reason outside the job (cluster restart, node loss).
    # Ray Train's own worker restarts inside one attempt are spec.resources.max_failures.
    max_retries: Annotated[int, NOT_BOOL] = Field(2, ge=0, le=MAX_RETRIES_LIMIT)
    # Queue order and preemption: a high job may stop a low one of any team when the pool is full.
    priority: Priority = "normal"
    # The job's team; only an admin may name one other than its own (403 otherwise). Default: own team.
    team: TeamName | None = None

    @model_validator(mode="before")
    @classmethod
    def _spec_of_kind(cls, data: Any) -> Any:
        """(Runs after ``_encodable``: pydantic runs "before" validators last-defined first.) The spec validated by its kind's model alone: a union would try every kind's model and
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



class ResizeWorkers(_Schema):
    """A training job on one pool at a new size; bounds come from the job (jobs/elastic.py)."""

    num_workers: Annotated[int, NOT_BOOL] = Field(ge=1, le=4096)


class ResizePools(_Schema):
    """A training job that spans pools at new worker counts for the same pools."""

    # additionalProperties: keys outside the pattern are invalid in the document too, as in pydantic.
    pools: dict[Annotated[str, Field(pattern=POOL_NAME_PATTERN)], Annotated[int, Field(ge=1, le=4096), NOT_BOOL]] = Field(
        min_length=1, max_length=16, json_schema_extra={"additionalProperties": False})


JobResize = ResizeWorkers | ResizePools


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


class JobsPublic(_Schema):
    data: list[JobSummary]
    count: int


class JobLogs(_Schema):
    job_id: str
    attempt: int | None
    ray_submission_id: str | None
    logs: str


# -- tokens, teams, audit (admin.py) ----------------------------------------------------------------

MAX_ROOTS = 64
MAX_QUOTAS = 64
MAX_QUOTA_DEVICES = 1_000_000.0


def _data_root(value: str) -> str:
    error = root_error(value)
    if error is not None:
        raise ValueError(error)
    return value


DataRoot = Annotated[str, Field(min_length=1, max_length=4096, pattern=ROOT_PATTERN), AfterValidator(_data_root)]
PoolName = Annotated[str, Field(pattern=NAME_PATTERN)]
# Strict: a JSON number only (``false`` is not a quota of 0).
Devices = Annotated[float, Field(ge=0.0, le=MAX_QUOTA_DEVICES, strict=True)]


class TokenCreate(_Schema):
    user: UserName
    team: TeamName
    role: Role = "user"


class TokenPublic(_Schema):
    """A token as listed: never its secret (only its hash is stored)."""

    id: str
    user: str
    team: str
    role: Role
    created_at: float
    created_by: str
    revoked_at: float | None

    @classmethod
    def of(cls, t: TokenRecord) -> TokenPublic:
        return cls(id=t.id, user=t.user, team=t.team, role=t.role, created_at=t.created_at,  # type: ignore[arg-type]
                   created_by=t.created_by, revoked_at=t.revoked_at)


class TokenCreated(TokenPublic):
    token: str  # the secret: shown in this answer only, never again


class TokensPublic(_Schema):
    data: list[TokenPublic]


class TeamUpdate(_Schema):
    """A team's settings; a field left out keeps its stored value."""

    # Absolute local folders or s3://bucket[/prefix] (orchestrator/auth/roots.py).
    roots: list[DataRoot] | None = Field(None, max_length=MAX_ROOTS)
    # Pool or device name -> devices (GPUs/NPUs for gpu/npu pools, CPUs for cpu pools).
    quotas: dict[PoolName, Devices] | None = Field(None, max_length=MAX_QUOTAS)
    # The highest priority the team's users may submit at (a new team: normal).
    max_priority: Priority | None = None


class TeamPublic(_Schema):
    name: str
    roots: list[str]
    quotas: dict[str, float]
    max_priority: Priority

    @classmethod
    def of(cls, t: TeamRecord) -> TeamPublic:
        return cls(name=t.name, roots=list(t.roots), quotas=t.quotas, max_priority=t.max_priority)  # type: ignore[arg-type]


class TeamsPublic(_Schema):
    data: list[TeamPublic]


class AuditEntry(_Schema):
    seq: int
    at: float
    actor: str
    team: str | None
    action: str
    target: str
    detail: str

    @classmethod
    def of(cls, a: AuditRecord) -> AuditEntry:
        return cls(seq=a.seq, at=a.at, actor=a.actor, team=a.team, action=a.action, target=a.target, detail=a.detail)


class AuditPublic(_Schema):
    data: list[AuditEntry]
    count: int


# -- cluster ---------------------------------------------------------------------------------------


class NodePublic(_Schema):
    node_id: str
    ip: str
    is_head: bool
    state: str
    device: Device  # the node's pool, in the specs' device vocabulary
    resources: dict[str, float]


class DevicePublic(_Schema):
    nodes: int
    resources: dict[str, float]


class PoolPublic(_Schema):
    """One pool (orchestrator/scheduler/pools.py): what its alive nodes have, who holds what, what waits."""

    device: Device
    nodes: int
    capacity: dict[str, float]
    max_capacity: dict[str, float]  # with what the autoscaler may add (ORCH_AUTOSCALER_MAX_EXTRA)
    reserved: dict[str, float]  # held by jobs the scheduler admitted (its own bookkeeping)
    unmanaged: dict[str, float]  # held by Ray jobs the service did not submit (`ray job submit`)
    in_use: dict[str, float]  # reserved + unmanaged
    free: dict[str, float]  # capacity - in_use: what the pool can give now
    queued_demand: dict[str, float]  # what QUEUED jobs waiting for this pool ask for
    queued_jobs: int


class ClusterPublic(_Schema):
    ray_address: str | None
    alive_nodes: int
    totals: dict[str, float]
    by_device: dict[str, DevicePublic]
    nodes: list[NodePublic]
    pools: dict[str, PoolPublic] = {}
    unmanaged_jobs: int = 0  # Ray jobs running beside the service's


# -- service ---------------------------------------------------------------------------------------


class Health(_Schema):
    status: Literal["ok"]


class Problem(_Schema):
    detail: str
