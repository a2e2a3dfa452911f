"""What the job store hands out: immutable records of a job, its state history and its attempts, and of
teams, user tokens and audit entries."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.states import JobState


def submission_id_for(job_id: str, attempt: int) -> str:
    """Ray's submission id for one attempt, derived from the job id: a resubmission after a crash
    reuses it, and Ray refuses a second job under the same id."""
    return f"orch-{job_id}-{attempt}"


def new_job_id() -> str:
    return secrets.token_hex(6)  # 48 random bits, 12 characters; the primary key catches a clash


class JobNotFound(KeyError):
    pass


class ResizeConflict(ValueError):
    """A resize of a job in a state that cannot take one (starting, retrying, preempting, finished)."""


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused with a different request body."""


@dataclass(frozen=True)
class EventRecord:
    seq: int
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: float


@dataclass(frozen=True)
class AttemptRecord:
    number: int
    submission_id: str
    created_at: float
    submitted_at: float | None
    ended_at: float | None
    ray_status: str | None
    ray_message: str | None
    exit_code: int | None


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    name: str
    state: JobState
    spec: dict[str, Any]
    max_retries: int
    attempts: int
    cancel_requested: bool
    idempotency_key: str | None
    request_hash: str | None
    metrics: dict[str, Any] | None
    metrics_at: float | None
    message: str | None
    created_at: float
    updated_at: float
    team: str = "admin"
    owner: str = "admin"
    priority: str = "normal"  # low | normal | high
    preemptions: int = 0
    queue_reason: str | None = None
    queue_position: int | None = None
    resizes: int = 0
    resize_spec: dict[str, Any] | None = None  # the size a RUNNING job was asked to restart at
    events: tuple[EventRecord, ...] = ()
    attempt_records: tuple[AttemptRecord, ...] = ()

    @property
    def current_attempt(self) -> AttemptRecord | None:
        return self.attempt_records[-1] if self.attempt_records else None

    @property
    def retries_left(self) -> int:
        return self.max_retries - max(self.retries_used, 0)

    @property
    def retries_used(self) -> int:
        """Attempts after the first that were retries: an attempt stopped by the scheduler (preempted)
        or by a user's resize was not lost, and uses up no retry."""
        return self.attempts - 1 - self.preemptions - self.resizes


@dataclass(frozen=True)
class TeamRecord:
    """A team's settings: data roots (local folders, ``s3://`` prefixes) its jobs may read and write,
    quotas (pool or device name -> devices: GPUs/NPUs for gpu/npu pools, CPUs for cpu pools) and the
    highest priority its users may submit at (a high job preempts every team's normal ones)."""

    name: str
    roots: tuple[str, ...] = ()
    quotas: dict[str, float] = field(default_factory=dict)
    max_priority: str = "normal"  # low | normal | high


@dataclass(frozen=True)
class TokenRecord:
    """A user's API token as stored: never the secret, only who holds it and whether it still works."""

    id: str
    user: str
    team: str
    role: str  # user | admin | scrape
    created_at: float
    created_by: str
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    actor: str
    team: str | None
    action: str
    target: str
    detail: str


class TokenNotFound(KeyError):
    pass


def job_from_rows(row: Any, events: Iterable[Any] = (), attempts: Iterable[Any] = ()) -> JobRecord:
    """A job record from its jobs row and (optionally) its job_events and attempts rows, in order."""
    m = row._mapping
    return JobRecord(
        id=m["id"], kind=m["kind"], name=m["name"], state=JobState(m["state"]), spec=json.loads(m["spec"]),
        max_retries=m["max_retries"], attempts=m["attempts"], cancel_requested=bool(m["cancel_requested"]),
        idempotency_key=m["idempotency_key"], request_hash=m["request_hash"],
        metrics=json.loads(m["metrics"]) if m["metrics"] else None, metrics_at=m["metrics_at"],
        message=m["message"], created_at=m["created_at"], updated_at=m["updated_at"],
        team=m["team"], owner=m["owner"], priority=m["priority"], preemptions=m["preemptions"],
        queue_reason=m["queue_reason"], queue_position=m["queue_position"], resizes=m["resizes"],
        resize_spec=json.loads(m["resize_spec"]) if m["resize_spec"] else None,
        events=tuple(
            EventRecord(e.seq, JobState(e.from_state) if e.from_state else None, JobState(e.to_state), e.reason, e.at)
            for e in events
        ),
        attempt_records=tuple(AttemptRecord(**{k: a._mapping[k] for k in AttemptRecord.__annotations__}) for a in attempts),
    )
