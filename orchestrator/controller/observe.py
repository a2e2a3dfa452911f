"""Reading a running attempt: its latest progress line, its final summary, whether it stalled, and,
when it failed, what failed.

Stalls: Ray says RUNNING forever when workers or Ray Data wait for CPUs the cluster never frees. An
attempt with no new step for ``stall_after_s`` (counted from when this process first sees it RUNNING)
gets ``stalled`` and ``stalled_for_s`` metrics and counts in ``orch_jobs_stalled`` until a step comes.
Split from the controller, which decides; this module only reads and records figures.

A failed attempt's reason leads with the job's own error (``failure_reason``): Ray's message starts
with its own preamble ("Job entrypoint command failed with exit code 1, last available logs ...")
and the driver's last 20,000 characters, runtime-env chatter first, so the line that says what went
wrong came last and was cut off by the reason's length limit. The full log stays one command away.

Logs are read by offset: each pass reads what the attempt's driver wrote since the last pass (at most
``PROGRESS_READ_BYTES``; when more came, the log's last ``PROGRESS_READ_BYTES``), so a pass costs the
same however old and long the log is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contracts.training import ProgressRecord, TrainSummary
from orchestrator.controller.entrypoints import job_paths
from orchestrator.ray_client import RayJobs, RayJobView
from orchestrator.settings import Settings
from orchestrator.store import JobRecord, Store
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
STALL_KEYS = frozenset({"stalled", "stalled_for_s"})  # the metrics a stalled attempt carries
PROGRESS_READ_BYTES = 256 * 1024  # the most one pass reads of one attempt's log
REASON_MAX_CHARS = 1000  # a state change's reason, as stored
ERROR_PREFIX = "error:"  # how every jobs/ entry point reports the failure it understood (to stderr)
TRACEBACK_HEADER = "Traceback (most recent call last):"


def own_error(log_text: str | None) -> str | None:
    """The job's own word on why it failed: the log's last line starting ``error:`` or, without one,
    the final line of its last traceback (the exception raised); None when the log has neither."""
    lines = (log_text or "").splitlines()
    errors = [line.strip() for line in lines if line.startswith(ERROR_PREFIX)]
    if errors:
        return errors[-1]
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK_HEADER)]
    if not starts:
        return None
    # The exception line is the first unindented line after the header (the frames are indented).
    return next((line.strip() for line in lines[starts[-1] + 1:] if line.strip() and not line[0].isspace()), None)


def failure_reason(job_id: str, view: RayJobView) -> str:
    """A failed attempt's reason: the job's own error first (else Ray's first line and the log's last
    line), then the exit code and where the whole log is."""
    message = view.message or ""
    head, _, logs = message.partition("\n")
    last = next((line.strip() for line in reversed(logs.splitlines()) if line.strip()), None)
    what = own_error(logs) or (f"Ray: {head} ... {last}" if last else f"Ray: {head or 'driver failed'}")
    code = f"exit code {view.exit_code}; " if view.exit_code is not None else ""
    where = f" ({code}full log: orch logs {job_id})"
    return what[:REASON_MAX_CHARS - len(where)] + where


@dataclass
class _LogMark:
    """How far an attempt's log was read, and the latest progress record in what was read."""
    submission_id: str
    offset: int | None = None  # None: not read yet (the first read takes the log's end)
    latest: dict[str, Any] | None = None


@dataclass
class _Progress:
    """The last step a RUNNING attempt reported (None: none yet) and when (controller clock) it changed."""
    attempt: int
    step: int | None
    since: float
    stalled: bool = False


class AttemptReader:
    """Metrics of the attempts the controller looks at; ``clock`` is the controller's (tests move it)."""

    def __init__(self, store: Store, ray: RayJobs, settings: Settings, telemetry: Telemetry,
                 clock: Callable[[], float]):
        self.store, self.ray, self.settings, self.telemetry, self.clock = store, ray, settings, telemetry, clock
        self._read_at: dict[str, float] = {}
        self._progress: dict[str, _Progress] = {}  # RUNNING job id -> its last step, for stall detection
        self._marks: dict[str, _LogMark] = {}  # job id -> where its current attempt's log was read to

    def keep_only(self, running: Iterable[str]) -> None:
        """Forget the attempts no longer RUNNING (finished, retried, cancelled since the last pass)."""
        running = set(running)
        for gone in self._progress.keys() - running:
            del self._progress[gone]
        for gone in self._marks.keys() - running:
            del self._marks[gone]

    @property
    def stalled(self) -> int:
        return sum(p.stalled for p in self._progress.values())

    def read(self, job: JobRecord, submission_id: str, final: bool = False) -> None:
        now = self.clock()
        last = self._read_at.get(job.id)
        if not final and last is not None and now - last < self.settings.metrics_interval_s:
            return
        self._read_at[job.id] = now
        latest = self._latest(job.id, submission_id)
        metrics = _unstalled({**(job.metrics or {}), **(latest or {})})
        if final:
            metrics.update(read_summary(job_paths(self.settings.job_root, job.id).summary))
            self._read_at.pop(job.id, None)
            self._marks.pop(job.id, None)
        else:
            metrics.update(self._stall_marks(job, latest["step"] if latest else None, now))
        if metrics != (job.metrics or {}):
            self.store.jobs.set_metrics(job.id, metrics)

    def _latest(self, job_id: str, submission_id: str) -> dict[str, Any] | None:
        """The attempt's latest progress record, from what its log gained since the last read."""
        mark = self._marks.get(job_id)
        if mark is None or mark.submission_id != submission_id:
            mark = self._marks[job_id] = _LogMark(submission_id)
        part = None
        if mark.offset is not None:
            part = self.ray.read_log(submission_id, mark.offset, PROGRESS_READ_BYTES)
        if part is None or part.end < part.size or part.size < mark.offset:
            part = self.ray.read_log(submission_id, None, PROGRESS_READ_BYTES)  # first, far behind, or a new log
        mark.offset = part.whole_lines()[1]  # an unterminated last line is read again next pass
        mark.latest = latest_progress(part.data.decode(errors="replace")) or mark.latest
        return mark.latest

    def _stall_marks(self, job: JobRecord, step: int | None, now: float) -> dict[str, Any]:
        """The stall metrics of a RUNNING attempt whose latest step is ``step`` ({} while it progresses)."""
        seen = self._progress.get(job.id)
        was_stalled = seen is not None and seen.stalled
        if seen is None or seen.attempt != job.attempts or seen.step != step:
            seen = self._progress[job.id] = _Progress(job.attempts, step, now)
        idle_s = now - seen.since
        seen.stalled = idle_s >= self.settings.stall_after_s
        if not seen.stalled:
            if was_stalled:
                log.info("job %s: progress resumed at step %s", job.id, step)
            return {}
        where = f"since step {step}" if step is not None else "and no step reported yet"
        reason = (f"no progress for {idle_s:.0f} s {where}; its workers or Ray Data may be waiting for resources "
                  "the cluster cannot give (see `orch logs` and `orch cluster`)")
        if not was_stalled:
            self.telemetry.stalls.inc()
            log.warning("job %s: %s", job.id, reason)
        return {"stalled": reason, "stalled_for_s": int(idle_s)}

    def clear_stall(self, job_id: str) -> None:
        """Drop the stall mark of an attempt that ended without a final metrics read (lost, stopped)."""
        metrics = self.store.jobs.get(job_id).metrics or {}
        if not STALL_KEYS.isdisjoint(metrics):
            self.store.jobs.set_metrics(job_id, _unstalled(metrics))


def latest_progress(logs: str) -> dict[str, Any] | None:
    """The last progress record in a log, as a job's metrics."""
    for line in reversed(logs.splitlines()):
        record = ProgressRecord.from_line(line)
        if record is not None:
            return record.model_dump()
    return None


def _unstalled(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in STALL_KEYS}


def read_summary(path: Path) -> dict[str, Any]:
    """A finished run's scalar figures from its summary.json; {} if it is missing or unreadable."""
    try:
        return TrainSummary.model_validate_json(path.read_text()).numbers()
    except (OSError, ValueError):
        return {}
