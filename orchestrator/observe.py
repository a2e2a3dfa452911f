"""Reading a running attempt: its latest progress line, its final summary, and whether it stalled.

Stalls: Ray says RUNNING forever when workers or Ray Data wait for CPUs the cluster never frees. An
attempt with no new step for ``stall_after_s`` (counted from when this process first sees it RUNNING)
gets ``stalled`` and ``stalled_for_s`` metrics and counts in ``orch_jobs_stalled`` until a step comes.
Split from the controller, which decides; this module only reads and records figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contracts import ProgressRecord, TrainSummary
from orchestrator.entrypoints import job_paths
from orchestrator.ray_client import RayJobs
from orchestrator.settings import Settings
from orchestrator.store import JobRecord, JobStore
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
STALL_KEYS = frozenset({"stalled", "stalled_for_s"})  # the metrics a stalled attempt carries


@dataclass
class _Progress:
    """The last step a RUNNING attempt reported (None: none yet) and when (controller clock) it changed."""
    attempt: int
    step: int | None
    since: float
    stalled: bool = False


class AttemptReader:
    """Metrics of the attempts the controller looks at; ``clock`` is the controller's (tests move it)."""

    def __init__(self, store: JobStore, ray: RayJobs, settings: Settings, telemetry: Telemetry,
                 clock: Callable[[], float]):
        self.store, self.ray, self.settings, self.telemetry, self.clock = store, ray, settings, telemetry, clock
        self._read_at: dict[str, float] = {}
        self._progress: dict[str, _Progress] = {}  # RUNNING job id -> its last step, for stall detection

    def keep_only(self, running: Iterable[str]) -> None:
        """Forget the attempts no longer RUNNING (finished, retried, cancelled since the last pass)."""
        for gone in self._progress.keys() - set(running):
            del self._progress[gone]

    @property
    def stalled(self) -> int:
        return sum(p.stalled for p in self._progress.values())

    def read(self, job: JobRecord, submission_id: str, final: bool = False) -> None:
        now = self.clock()
        last = self._read_at.get(job.id)
        if not final and last is not None and now - last < self.settings.metrics_interval_s:
            return
        self._read_at[job.id] = now
        latest = latest_progress(self.ray.logs(submission_id))
        metrics = _unstalled({**(job.metrics or {}), **(latest or {})})
        if final:
            metrics.update(read_summary(job_paths(self.settings.job_root, job.id).summary))
            self._read_at.pop(job.id, None)
        else:
            metrics.update(self._stall_marks(job, latest["step"] if latest else None, now))
        if metrics != (job.metrics or {}):
            self.store.set_metrics(job.id, metrics)

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
        metrics = self.store.get(job_id).metrics or {}
        if not STALL_KEYS.isdisjoint(metrics):
            self.store.set_metrics(job_id, _unstalled(metrics))


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
