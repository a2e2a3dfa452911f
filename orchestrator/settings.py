"""Control-plane settings: environment variables ``ORCH_*``, validated, failing closed.

Outside local mode the service refuses to start without a strong API token (``ORCH_API_TOKEN``).
Local mode (``orch up --local``, ``make demo``) makes one up and keeps it in ``<state_dir>/api_token``
(mode 0600) so the CLI on the same machine finds it; the API still checks it on every request.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Tokens anyone would guess; refused even when long enough.
WEAK_TOKENS = frozenset({"changethis", "changeme", "secret", "token", "password", "admin", "test"})
MIN_TOKEN_CHARS = 16
TOKEN_FILE = "api_token"

# An interpreter name or absolute path, never a shell fragment (it is shlex-quoted anyway).
_PYTHON_PATTERN = r"^[A-Za-z0-9_./+-]{1,256}$"


class SettingsError(ValueError):
    """Settings that must not be served; the message says which variable to set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore", frozen=True)

    # Local development mode: an API token is generated when none is given.
    local: bool = False
    # Where the job store, per-job spec files and outputs live.
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".orch")
    # Any SQLAlchemy URL; None means SQLite (WAL mode) at <state_dir>/orch.db.
    db_url: str | None = None
    # FULL: every stored job survives power loss; NORMAL: it survives a crash of the service (WAL), and
    # submissions are faster (no fsync per commit).
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # Per-job folders (spec.json, out/). Ray drivers read and write here, so on a remote cluster this
    # must be a path every node sees at the same place (NFS); s3:// outputs come later.
    jobs_dir: Path | None = None
    api_token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Ray dashboard HTTP address used by the Jobs SDK, e.g. http://127.0.0.1:8265. RAY_ADDRESS is read
    # too (the Jobs SDK itself prefers it), so one variable points both `ray job submit` and us at a cluster.
    ray_address: str | None = Field(None, validation_alias=AliasChoices("ORCH_RAY_ADDRESS", "RAY_ADDRESS"))
    # The Ray session's logs folder on this machine (`orch up` sets it): driver logs found there are read
    # by offset; without it, through Ray's state API (whole files).
    ray_logs_dir: Path | None = None
    # host:port of the cluster's GCS (``ray start --head --port``). When set, the service connects a Ray
    # driver there and shows each job that waits for room to the autoscaler as a pending placement
    # group (orchestrator/controller/demand_groups.py); unset: queued jobs' demand stays invisible to Ray.
    ray_gcs_address: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")
    # Token for a Ray cluster started with RAY_AUTH_MODE=token (sent as a bearer header to the dashboard).
    ray_auth_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ORCH_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN")
    )
    # The interpreter the Ray job runs: `python` is what `ray job submit -- python -m jobs.train` runs.
    job_python: str = Field("python", pattern=_PYTHON_PATTERN)
    # Custom resources reserved for each job's driver (JSON object), e.g. {"head": 0.01} to pin drivers.
    driver_resources: dict[str, float] = Field(default_factory=dict)
    # Jobs handed to Ray at once; further jobs wait QUEUED (a small cluster thrashes otherwise).
    max_active_jobs: int = Field(4, ge=1, le=10_000)
    reconcile_interval_s: float = Field(1.0, gt=0.0, le=60.0)
    # How often a RUNNING job's logs are read for its latest progress line.
    metrics_interval_s: float = Field(5.0, gt=0.0, le=3600.0)
    # A RUNNING job whose driver prints no new progress line for this long is marked stalled (its
    # metrics say so; orch_jobs_stalled counts it) until a new step comes: workers or Ray Data
    # waiting for CPUs the cluster never frees look exactly like this. Longer than the slowest
    # start-up (tokenizing a corpus, worker start) plus one log_every of steps.
    stall_after_s: float = Field(600.0, gt=0.0, le=7 * 24 * 3600.0)
    # Largest accepted request body; a spec is a few KB.
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Longest a `logs?follow=true` stream stays open.
    follow_max_s: float = Field(3600.0, gt=0.0, le=7 * 24 * 3600.0)
    # How long a cancelled job that Ray still holds PENDING (its driver unschedulable) waits for Ray to
    # confirm the stop before it is marked CANCELLED anyway.
    cancel_grace_s: float = Field(30.0, ge=0.0, le=3600.0)
    # How long a cancel of a RUNNING job waits for its training loop to confirm the "checkpoint now"
    # request (workers/control.py) before Ray stops it; the loop answers within one step once it runs.
    stop_checkpoint_timeout_s: float = Field(20.0, ge=0.0, le=3600.0)
    # Seconds each Ray SDK HTTP call may take before the controller gives up on this iteration.
    ray_timeout_s: float = Field(30.0, gt=0.0, le=300.0)
    # How long an API process trusts a user token it has looked up before reading the store again: a
    # revoke reaches other API processes sharing the database within this time (its own at once).
    token_cache_s: float = Field(10.0, ge=0.0, le=300.0)
    # What the autoscaler may still add, per pool (JSON: {"gpu-a100": {"GPU": 16, "CPU": 128}}); a job
    # larger than a pool's nodes plus this is refused at submit. Default: no autoscaler, the nodes are all.
    autoscaler_max_extra: dict[str, dict[str, Annotated[float, Field(ge=0.0)]]] = Field(default_factory=dict)
    # Run the reconcile loop inside the API process (off only for API-only benchmarks and tests).
    controller_enabled: bool = True
    # Serving (orchestrator/deployments/reconciler.py): where Serve's HTTP proxy listens when a deploy starts
    # Serve (the first one does; later ones join it), and the base URL clients reach it at (default
    # http://<serve_host>:<serve_port>; set it when clients go through a load balancer or DNS name).
    serve_host: str = Field("127.0.0.1", pattern=r"^[A-Za-z0-9_.:\[\]-]{1,253}$")
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_url: str | None = Field(None, pattern=r"^https?://[^\s/]+$")
    # Between two passes of the deployment reconciler (one Serve status read, one Ray job status per
    # deployment); creates and deletes wake it at once.
    deploy_interval_s: float = Field(5.0, gt=0.0, le=3600.0)
    # Failed deploy (or delete) jobs in a row before a deployment is left FAILED.
    deploy_max_failures: int = Field(3, ge=1, le=100)

    @field_validator("driver_resources", "autoscaler_max_extra", mode="before")
    @classmethod
    def _parse_resources(cls, v: object) -> object:
        return json.loads(v) if isinstance(v, str) else v

    @field_validator("autoscaler_max_extra", mode="after")
    @classmethod
    def _pool_names(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from jobs.contracts.pools import check_pool_name

        for name in v:
            check_pool_name(name)
        return v

    @field_validator("state_dir", "jobs_dir", "ray_logs_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @model_validator(mode="after")
    def _fail_closed(self) -> Settings:
        if self.api_token is None:
            if not self.local:
                raise ValueError("ORCH_API_TOKEN is required outside local mode (orch up --local)")
            return self
        token = self.api_token.get_secret_value()
        if len(token) < MIN_TOKEN_CHARS or token.lower() in WEAK_TOKENS:
            raise ValueError(f"ORCH_API_TOKEN must be at least {MIN_TOKEN_CHARS} characters and not a default")
        return self

    @cached_property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.state_dir / 'orch.db'}"

    @cached_property
    def serve_base_url(self) -> str:
        return self.serve_url or f"http://{self.serve_host}:{self.serve_port}"

    @cached_property
    def job_root(self) -> Path:
        return self.jobs_dir or self.state_dir / "jobs"

    @cached_property
    def token(self) -> str:
        """The API token: configured, or (local mode) read from or written to the state dir."""
        if self.api_token is not None:
            return self.api_token.get_secret_value()
        return local_token(self.state_dir, create=True)


def local_token(state_dir: Path, *, create: bool) -> str:
    path = state_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if len(token) >= MIN_TOKEN_CHARS:
            return token
    if not create:
        raise SettingsError(f"no API token: set ORCH_API_TOKEN (or run `orch up --local` to make {path})")
    token = secrets.token_urlsafe(32)
    write_secret(path, token)
    return token


def write_secret(path: Path, value: str) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and explicit overrides), or SettingsError naming the problem."""
    from pydantic import ValidationError

    from jobs.specs.base import field_errors

    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(field_errors(e.errors(), root="settings"))
        raise SettingsError(problems) from None

