"""The "checkpoint now" side channel between whoever stops or moves a job and its training loop.

A request is a small JSON file in the job's control folder (``<out>/control``, beside the
checkpoints): the controller (preemption, resize, drain, cancel) or the job's driver (on SIGTERM
from Ray Jobs, which sends SIGKILL 3 s later) writes it; rank 0 of the running loop looks for it
after every step, all ranks agree on it in one tiny all-reduce, and the loop checkpoints at the
end of that step. When the checkpoint has been reported the loop writes the confirmation, which
names the request, the step and the reason. A request made before a stop also asks the loop to hold
(``hold_s``): take no further step until it is stopped, at most that long (then it trains on, and
nothing is lost). So a job stopped this way resumes from the step it had finished when asked, plus
at most the step in flight, instead of up to a checkpoint interval back. A request with ``stop`` ends
the run after its checkpoint instead (a sweep's trial stopped on request, jobs/runtime/sweep_trial.py).

Files, not Ray actors: the writer may be the control plane, which reaches the cluster only through
the Jobs API, and a retry of the job finds a request that its previous attempt never saw. Writes
are atomic (a temp file then ``os.replace``), so a reader never sees half a request. The folder
must be shared by the writer and the rank-0 worker's node: the same rule as the job's output
folder (README, "Remote clusters"). Torch-free: the control plane imports it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from workers.waiting import wait_until

CONTROL_DIR = "control"
REQUEST_FILE = "checkpoint_request.json"
DONE_FILE = "checkpoint_done.json"


class CheckpointRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    reason: str = Field(max_length=500)
    requested_at: float  # unix seconds
    hold_s: float = Field(0.0, ge=0.0, le=3600.0)  # after the checkpoint, wait this long to be stopped
    stop: bool = False  # after the checkpoint, end the run (its last report is that checkpoint's)


class CheckpointDone(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    reason: str
    step: int  # the step the checkpoint holds
    at: float  # unix seconds, when the checkpoint was reported


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path, model: type[BaseModel]) -> BaseModel | None:
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a file this code did not write: ignored, never fatal to a running job
        return None


class ControlChannel:
    """One job's control folder: ``ControlChannel(out_dir)``."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / CONTROL_DIR

    # -- the requester's side ------------------------------------------------------------------

    def request_checkpoint(self, reason: str, hold_s: float = 0.0, stop: bool = False) -> CheckpointRequest:
        """Ask the running loop for a checkpoint at the end of its current step; with ``hold_s``, the
        loop then steps no further for up to that long (the requester is about to stop it); with
        ``stop``, the loop ends there."""
        req = CheckpointRequest(id=uuid.uuid4().hex[:16], reason=reason[:500], requested_at=time.time(),
                                hold_s=hold_s, stop=stop)
        _write_atomic(self.root / REQUEST_FILE, req.model_dump_json())
        return req

    def withdraw(self, request: CheckpointRequest) -> None:
        """Take back a request that went unanswered (its job is being stopped anyway), so that the
        next attempt does not answer it, or hold for it, as its own. A newer request stays."""
        path = self.root / REQUEST_FILE
        current = _read(path, CheckpointRequest)
        if isinstance(current, CheckpointRequest) and current.id == request.id:
            path.unlink(missing_ok=True)

    def confirmation(self, request: CheckpointRequest | str) -> CheckpointDone | None:
        """The loop's confirmation of this request, once its checkpoint has been reported."""
        request_id = request if isinstance(request, str) else request.id
        done = _read(self.root / DONE_FILE, CheckpointDone)
        return done if isinstance(done, CheckpointDone) and done.request_id == request_id else None

    def wait_for_checkpoint(self, request: CheckpointRequest, timeout_s: float,
                            poll_s: float = 0.1) -> CheckpointDone | None:
        """The confirmation, or None if none came within ``timeout_s``."""
        try:
            return wait_until(lambda: self.confirmation(request), timeout_s=timeout_s, interval_s=poll_s,
                              what=f"checkpoint request {request.id}")
        except TimeoutError:
            return None

    # -- the loop's side -----------------------------------------------------------------------

    def pending(self) -> CheckpointRequest | None:
        """The request not yet confirmed, if any (a cheap stat when there is none)."""
        req = _read(self.root / REQUEST_FILE, CheckpointRequest)
        if not isinstance(req, CheckpointRequest):
            return None
        done = _read(self.root / DONE_FILE, CheckpointDone)
        if isinstance(done, CheckpointDone) and done.request_id == req.id:
            return None
        return req

    def confirm(self, request: CheckpointRequest, step: int) -> CheckpointDone:
        done = CheckpointDone(request_id=request.id, reason=request.reason, step=step, at=time.time())
        _write_atomic(self.root / DONE_FILE, done.model_dump_json())
        return done
