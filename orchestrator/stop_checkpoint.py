"""A checkpoint before every stop the control plane makes (cancel, preemption, resize).

Ray Jobs gives a stopping driver 3 s before SIGKILL, so a plain stop would lose up to a checkpoint
interval of steps. Instead the first reconcile pass asks the job's loop for a checkpoint now
(workers/control.py, files in the job's output folder), later passes wait for its confirmation, at
most ``stop_checkpoint_timeout_s``, and only then is the Ray job stopped. What the checkpoint did is
kept as a note for the reason of the job's next state.
"""

from __future__ import annotations

from collections.abc import Callable

from jobs.contracts import CheckpointRequest, ControlChannel
from orchestrator.entrypoints import job_paths
from orchestrator.settings import Settings

# The kinds whose job runs one training loop that answers a "checkpoint now" request. A sweep's
# trials checkpoint through Tune and resume with Tuner.restore; a prepare job resumes from its done
# shards; a serve job has no state: asking them would only wait out the timeout.
ANSWERING_KINDS = frozenset({"train"})


class StopCheckpoints:
    """Per job: the pending "checkpoint now" request and, once it is settled, a note on it."""

    def __init__(self, settings: Settings, clock: Callable[[], float]):
        self.settings = settings
        self.clock = clock
        self._asked: dict[str, tuple[CheckpointRequest, float]] = {}  # job id -> (request, when)
        self._notes: dict[str, str] = {}  # job id -> what the checkpoint before its stop did

    def ready(self, job_id: str, why: str, kind: str = "train") -> bool:
        """Whether the running job may be stopped now: its checkpoint is confirmed or the wait is over."""
        if kind not in ANSWERING_KINDS:
            self._notes[job_id] = f"no checkpoint asked (a {kind} job resumes on its own)"
            return True
        channel = ControlChannel(job_paths(self.settings.job_root, job_id).out)
        asked = self._asked.get(job_id)
        if asked is None:
            asked = self._asked[job_id] = (channel.request_checkpoint(why), self.clock())
        request, at = asked
        done = channel.confirmation(request)
        timeout_s = self.settings.stop_checkpoint_timeout_s
        if done is None and self.clock() - at < timeout_s:
            return False
        del self._asked[job_id]
        self._notes[job_id] = (f"checkpoint at step {done.step} first" if done else
                               f"no checkpoint confirmed within {timeout_s:.0f} s")
        return True

    def note(self, job_id: str) -> str | None:
        """What the checkpoint before this job's stop did (once: the note is handed out and dropped)."""
        return self._notes.pop(job_id, None)
