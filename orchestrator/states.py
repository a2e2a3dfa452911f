"""A job's life as a typed state machine: the states, the moves allowed between them, and the check.

``store.jobs.transition`` is the one place that moves a job; it calls ``check_transition`` inside the
same database transaction that records the move and its reason.
"""

from __future__ import annotations

from enum import Enum

from jobs.contracts.terminal import PublishesTerminal


class JobState(PublishesTerminal, str, Enum):
    PENDING = "PENDING"
    """Stored by the API; the controller has not looked at it yet."""
    QUEUED = "QUEUED"
    """Accepted by the controller, waiting for the scheduler to admit it (room in its pools, its team's
    quota, an active-job slot); its queue position and reason say why. A preempted job comes back here."""
    STARTING = "STARTING"
    """An attempt's Ray submission id is stored; the job is being (or has been) submitted and Ray
    reports it PENDING (runtime env set-up, waiting for the driver's resources)."""
    RUNNING = "RUNNING"
    """Ray reports the attempt's driver RUNNING."""
    PREEMPTING = "PREEMPTING"
    """A higher-priority job needs its resources: its loop is asked to checkpoint now, then its Ray job
    is stopped and it returns to QUEUED; the next attempt resumes from that checkpoint (same output),
    at most one step lost. A preemption does not use up ``max_retries``."""
    RESIZING = "RESIZING"
    """A user asked for a new size (``PATCH /v1/jobs/{id}``, ``orch scale``): as in PREEMPTING its loop
    checkpoints now, then its Ray job is stopped; it returns to QUEUED with the new size stored in its
    spec, and the scheduler admits it again with its new demand. The next attempt resumes from that
    checkpoint in the same output (checkpoints do not depend on the world size), at most one step lost.
    A resize does not use up ``max_retries``."""
    RETRYING = "RETRYING"
    """The attempt's driver died for a reason outside the job (the cluster restarted, the driver's node
    died, the driver was killed); a new attempt resumes from the latest checkpoint in the same output."""
    SUCCEEDED = "SUCCEEDED"
    """The driver exited 0. Terminal."""
    FAILED = "FAILED"
    """The driver exited non-zero (invalid spec, training error), or retries ran out. Terminal."""
    CANCELLED = "CANCELLED"
    """A user cancelled it; its Ray job, if any, is stopped. Terminal."""

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# Jobs that hold (or are about to hold) cluster resources, and take an active-job slot.
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING, JobState.RETRYING, JobState.PREEMPTING,
                    JobState.RESIZING})

_S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    _S.PENDING: frozenset({_S.QUEUED, _S.CANCELLED, _S.FAILED}),
    _S.QUEUED: frozenset({_S.STARTING, _S.CANCELLED, _S.FAILED}),
    # STARTING -> SUCCEEDED/FAILED: a short job can finish between two looks.
    _S.STARTING: frozenset({_S.RUNNING, _S.RETRYING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.RETRYING, _S.PREEMPTING, _S.RESIZING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    # PREEMPTING -> QUEUED: stopped after its checkpoint; -> SUCCEEDED/FAILED: it ended first; ->
    # RETRYING: its driver died meanwhile (a retry, counted as one).
    _S.PREEMPTING: frozenset({_S.QUEUED, _S.RETRYING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    # RESIZING -> QUEUED: stopped after its checkpoint (or its driver died meanwhile: it was being
    # stopped anyway), the new size stored; -> SUCCEEDED/FAILED: it ended first.
    _S.RESIZING: frozenset({_S.QUEUED, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    _S.RETRYING: frozenset({_S.STARTING, _S.FAILED, _S.CANCELLED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A move the state machine does not allow (e.g. out of a terminal state)."""


def check_transition(current: JobState, target: JobState) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(f"a job cannot move from {current} to {target}")
