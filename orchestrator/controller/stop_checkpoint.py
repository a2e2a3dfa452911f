"""A checkpoint before every stop the control plane makes (cancel, preemption, resize).

Ray Jobs gives a stopping driver 3 s before SIGKILL, so a plain stop would lose up to a checkpoint
interval of steps. Instead the first reconcile pass asks the job's loop for a checkpoint now
(workers/control.py, files in the job's output folder), later passes wait for its confirmation, at
most ``stop_checkpoint_timeout_s``, and only then is the Ray job stopped. The request asks the loop
to hold after its checkpoint (``HOLD_S``): it takes no further step while the stop travels through
Ray, so the next attempt resumes from the step the loop had reached (at most the step in flight when
asked is redone). What the checkpoint did is kept as a note for the reason of the job's next state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jobs.contracts.training import CheckpointRequest, ControlChannel
from jobs.kinds import job_kind
from orchestrator.controller.entrypoints import job_paths
from orchestrator.settings import Settings

# How long the loop waits to be stopped after the checkpoint: a few reconcile passes and Ray's stop
# (SIGTERM, SIGKILL 3 s later) fit many times over; if no stop comes, training goes on.
HOLD_S = 120.0


@dataclass
class _Asked:
    attempt: str  # the Ray submission id the request was made to
    request: CheckpointRequest
    at: float
    settled: bool = False  # confirmed or waited out: the stop may go (again, while Ray carries it out)


class StopCheckpoints:
    """Per job: the "checkpoint now" request made to its running attempt and, once it is settled, a
    note on it. Settled stays settled for that attempt: the passes that repeat the stop until Ray
    reports it never ask again (the loop holds at its checkpoint meanwhile). A later attempt of the
    same job is asked afresh."""

    def __init__(self, settings: Settings, clock: Callable[[], float]):
        self.settings = settings
        self.clock = clock
        self._asked: dict[str, _Asked] = {}  # job id -> the request to its current attempt
        self._notes: dict[str, str] = {}  # job id -> what the checkpoint before its stop did

    def ready(self, job_id: str, attempt: str, why: str, kind: str = "train") -> bool:
        """Whether the running attempt (its submission id) may be stopped now: its checkpoint is
        confirmed or the wait is over. A kind that answers no "checkpoint now" (jobs/kinds/:
        ``checkpoint_on_stop``) resumes on its own: asking it would only wait out the timeout."""
        rules = job_kind(kind)
        if not rules.checkpoint_on_stop:
            self._notes[job_id] = f"no checkpoint asked ({rules.resumes})"
            return True
        channel = ControlChannel(job_paths(self.settings.job_root, job_id).out)
        asked = self._asked.get(job_id)
        if asked is None or asked.attempt != attempt:
            asked = self._asked[job_id] = _Asked(attempt, channel.request_checkpoint(why, hold_s=HOLD_S),
                                                 self.clock())
        if asked.settled:
            return True
        done = channel.confirmation(asked.request)
        timeout_s = self.settings.stop_checkpoint_timeout_s
        if done is None and self.clock() - asked.at < timeout_s:
            return False
        asked.settled = True
        if done is None:
            channel.withdraw(asked.request)  # unanswered: no later attempt should take it as its own
        self._notes[job_id] = (f"checkpoint at step {done.step} first" if done else
                               f"no checkpoint confirmed within {timeout_s:.0f} s")
        return True

    def note(self, job_id: str) -> str | None:
        """What the checkpoint before this job's stop did (once: the note is handed out and the
        request forgotten)."""
        self._asked.pop(job_id, None)
        return self._notes.pop(job_id, None)
