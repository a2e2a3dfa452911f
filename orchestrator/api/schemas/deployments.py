"""API schemas of /v1/deployments and /v1/sweeps/{id}/promote (routes/deployments.py).

The serving settings are ServeSpec's own (jobs/specs/serve.py: batching, autoscaling, limits, CPUs,
int8), so a deployment made over REST is the deployment ``python -m jobs.serve`` makes from a YAML
file. Two fields are the service's, never a client's: the key (the service makes it, shows it once
and stores only its SHA-256) and, for ``job_id`` and promote, the checkpoint.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.specs.serve import ServeSpec
from orchestrator.api.schemas.base import JOB_ID_PATTERN, Name, Request
from orchestrator.store import DeploymentRecord, DeploymentStatus

DEPLOYMENT_ID_PATTERN = r"^d[0-9a-f]{12}$"


class ServeOptions(ServeSpec):
    """A ServeSpec whose checkpoint may come from elsewhere (a job, a sweep's best trial), and
    whose key is the service's to make (the schema says so: null only)."""

    checkpoint: str | None = Field(None, min_length=1)  # type: ignore[assignment]
    key_sha256: None = None  # type: ignore[assignment]
    stats_key_sha256: None = None  # type: ignore[assignment]

    @field_validator("key_sha256", "stats_key_sha256", mode="before")
    @classmethod
    def _no_key(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("the service makes each deployment's keys (the bearer key shown once); leave it unset")


class PromoteOptions(ServeOptions):
    """The serving settings of a promoted deployment: the checkpoint is the sweep's best trial's."""

    checkpoint: None = None  # type: ignore[assignment]

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _no_checkpoint(cls, v: Any) -> None:
        if v is not None:
            raise ValueError("a promoted deployment serves the sweep's best checkpoint; leave it unset")


class _DeploymentOptions(Request):
    # The Serve application name and model id; default: the spec's name if given, else the
    # deployment's id. Unique on the cluster (Serve's names are), like the route prefix; at most 64
    # characters, as ServeSpec.name.
    name: Name | None = None
    # The deployment's team; only an admin may name one other than its own. Default: own team.
    team: Name | None = None


class PromoteCreate(_DeploymentOptions):
    """Serve a sweep's best trial: its checkpoint, with these serving settings."""

    spec: PromoteOptions = PromoteOptions()


class DeploymentCreate(_DeploymentOptions):
    """A deployment: ``spec`` with its ``checkpoint`` (a checkpoint folder or a run's output folder,
    under the team's data roots), or ``job_id``: a finished training job's latest checkpoint."""

    # Exactly one source; the schema states it too, for clients that generate requests from it.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["job_id"], "properties": {"job_id": {"type": "string"}, "spec": {
            "properties": {"checkpoint": {"type": "null"}}}}},
        {"required": ["spec"], "properties": {"job_id": {"type": "null"}, "spec": {
            "required": ["checkpoint"], "properties": {"checkpoint": {"type": "string"}}}}},
    ]})

    spec: ServeOptions = ServeOptions()
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)

    @model_validator(mode="after")
    def _one_source(self) -> DeploymentCreate:
        if (self.spec.checkpoint is None) == (self.job_id is None):
            raise ValueError("give exactly one of spec.checkpoint (a path) and job_id (a finished job)")
        return self


class DeploymentPublic(BaseModel):
    id: str
    name: str  # the Serve application, and the model id clients pass
    team: str
    owner: str
    status: DeploymentStatus
    message: str | None  # what happened last; while QUEUED, why it waits (quota, room) and its place
    checkpoint: str  # the checkpoint folder it serves (resolved when it was created)
    source: str | None  # where the checkpoint came from: a path, "job <id>", "sweep <id> trial <t>"
    route_prefix: str
    base_url: str  # the OpenAI client's base_url: <Serve's URL><route_prefix>/v1
    replicas: dict[str, int]  # replica state (RUNNING, STARTING, ...) -> count, as last seen
    created_at: float
    updated_at: float
    checked_at: float | None  # the reconciler's last look at Serve
    spec: dict[str, Any]  # the ServeSpec as deployed (the key's SHA-256, never the key)

    @classmethod
    def of(cls, d: DeploymentRecord, serve_url: str) -> DeploymentPublic:
        return cls(id=d.id, name=d.name, team=d.team, owner=d.owner, status=d.status, message=d.message,
                   checkpoint=d.checkpoint, source=d.source, route_prefix=d.route_prefix,
                   base_url=f"{serve_url}{d.route_prefix.rstrip('/')}/v1", replicas=d.replicas,
                   created_at=d.created_at, updated_at=d.updated_at, checked_at=d.checked_at, spec=d.spec)


class DeploymentCreated(DeploymentPublic):
    api_key: str  # the bearer key: shown in this answer only; the service keeps its SHA-256


class DeploymentsPublic(BaseModel):
    data: list[DeploymentPublic]
    count: int


class ReplicaFigures(BaseModel):
    """One replica's /v1/stats (workers/serving/stats.py): counts since it started, latencies over
    its latest rows, rates over the last minute; the figures of Grafana's serving row."""

    model_config = ConfigDict(extra="ignore")  # a newer replica may say more

    replica: str
    requests: int
    rows: int
    running_rows: int
    completion_tokens: int
    tokens_generated: int
    prefix_hit_tokens: int = 0
    batch_sizes: dict[int, int]
    mean_batch_rows: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p95: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p95: float | None = None
    queue_wait_ms_p50: float | None = None
    queue_wait_ms_p95: float | None = None
    prompt_tokens_per_s: float | None = None
    completion_tokens_per_s: float | None = None
    requests_by_status: dict[str, int] = {}


class DeploymentStats(BaseModel):
    id: str
    status: DeploymentStatus
    replicas: list[ReplicaFigures]  # one per replica reached, by replica id; empty while none serves
    message: str | None  # why there are no figures (nothing serves yet)
