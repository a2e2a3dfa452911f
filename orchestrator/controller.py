"""The reconcile loop: stored intent -> Ray Jobs API, one pass at a time.

Each pass reads every non-terminal job from the store and moves it one step toward what it should be,
using what Ray reports. Order of effects for a start: write spec.json, store the attempt (with the Ray
submission id derived from the job id) and the STARTING move, THEN call Ray. A crash between the two
leaves a STARTING attempt that was never submitted; the next pass (after a restart) asks Ray about
that submission id and submits only if Ray does not know it, so at most one Ray job runs per attempt.

Retries: when Ray (reachable) no longer knows a submitted attempt (the cluster restarted), or reports
the driver killed from outside (supervisor died, driver killed by a signal), the job moves to
RETRYING and the next pass starts attempt n+1 with the same --out, so jobs.train resumes from the
latest checkpoint. Exit codes 1 and 2 (training error, invalid spec) are the job's own failure: FAILED.

Stalls: Ray says RUNNING forever when workers or Ray Data wait for CPUs the cluster never frees. An
attempt with no new step for ``stall_after_s`` (counted from when this process first sees it RUNNING)
gets ``stalled`` and ``stalled_for_s`` metrics and counts in ``orch_jobs_stalled`` until a step comes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs.contracts import CheckpointRequest, ControlChannel, ProgressRecord, TrainSummary
from jobs.kinds import job_kind
from jobs.specs import field_errors
from orchestrator.entrypoints import ALLOWED_ENTRYPOINTS, build_entrypoint, job_paths
from orchestrator.ray_client import RayJobs, RayJobView, RayRefused, RayUnavailable
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE, IllegalTransition, JobState
from orchestrator.store import JobRecord, JobStore
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
S = JobState

# Ray error types that mean the driver died from outside the job, so a new attempt may succeed.
RETRYABLE_RAY_ERRORS = frozenset({
    "JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE", "JOB_SUPERVISOR_ACTOR_START_FAILURE",
})
STALL_KEYS = frozenset({"stalled", "stalled_for_s"})  # the metrics a stalled attempt carries


@dataclass
class _Progress:
    """The last step a RUNNING attempt reported (None: none yet) and when (controller clock) it changed."""
    attempt: int
    step: int | None
    since: float
    stalled: bool = False


class ControllerBusy(RuntimeError):
    """Another controller process holds this state dir's lock."""


def _retryable(view: RayJobView) -> bool:
    if view.error_type in RETRYABLE_RAY_ERRORS:
        return True
    # Killed by a signal: Popen reports -N, a shell that did not exec reports 128+N.
    return view.exit_code is not None and (view.exit_code < 0 or view.exit_code > 128)


def no_fault(point: str) -> None:
    """The default ``fault_hook``: every named point passes."""


class Controller:
    """``fault_hook`` is called with the name of each point where a crash matters to correctness
    ("before_submit": the attempt is stored, Ray not yet called); a test injects one that kills the
    process there, and checks that the next controller recovers."""

    def __init__(self, store: JobStore, ray: RayJobs, settings: Settings, telemetry: Telemetry | None = None,
                 entrypoints: dict[str, str] = ALLOWED_ENTRYPOINTS, clock=time.monotonic,
                 fault_hook: Callable[[str], None] = no_fault):
        self.store = store
        self.ray = ray
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.entrypoints = entrypoints
        self.clock = clock
        self.fault_hook = fault_hook
        self.ray_reachable: bool | None = None
        self.last_pass_at: float | None = None
        self._metrics_read_at: dict[str, float] = {}
        self._progress: dict[str, _Progress] = {}  # RUNNING job id -> its last step, for stall detection
        self._stop_sent_at: dict[str, float] = {}
        self._checkpoint_asked: dict[str, tuple[CheckpointRequest, float]] = {}  # job id -> (request, when)
        self._stop_notes: dict[str, str] = {}  # job id -> what the checkpoint before its stop did
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # -- one pass ---------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        self.telemetry.reconciles.inc()
        jobs = self.store.unfinished()
        active = sum(job.state in ACTIVE for job in jobs)
        for gone in self._progress.keys() - {job.id for job in jobs if job.state is S.RUNNING}:
            del self._progress[gone]  # finished, retried or cancelled since the last pass
        try:
            for job in jobs:
                try:
                    started = self._reconcile(job, active_slots=self.settings.max_active_jobs - active)
                    active += started
                except RayUnavailable:
                    raise
                except (IllegalTransition, RayRefused) as e:
                    self.telemetry.reconcile_errors.labels("job").inc()
                    log.warning("job %s: %s", job.id, e)
                except Exception:  # one job's trouble (a full disk, a bad row) must not stall the others
                    self.telemetry.reconcile_errors.labels("job").inc()
                    log.exception("job %s: reconcile failed", job.id)
            self.ray_reachable = True
        except RayUnavailable as e:
            # Nothing can be learned this pass; every job keeps its state until Ray answers.
            self.telemetry.reconcile_errors.labels("ray_unavailable").inc()
            if self.ray_reachable is not False:
                log.warning("%s", e)
            self.ray_reachable = False
        self.telemetry.ray_reachable.set(1 if self.ray_reachable else 0)
        self.telemetry.jobs_stalled.set(sum(p.stalled for p in self._progress.values()))
        self.last_pass_at = time.time()

    def _reconcile(self, job: JobRecord, active_slots: int) -> int:
        """Move one job one step; returns 1 when it took an active slot."""
        if job.cancel_requested:
            self._cancel(job)
            return 0
        if job.state is S.PENDING:
            self._accept(job)
        elif job.state is S.QUEUED:
            if active_slots > 0:
                self._start_attempt(job)
                return 1
        elif job.state is S.RETRYING:
            self._start_attempt(job)
        elif job.state is S.STARTING and job.current_attempt.submitted_at is None:
            self._submit(job)
        elif job.state in (S.STARTING, S.RUNNING):
            self._observe(job)
        return 0

    def _accept(self, job: JobRecord) -> None:
        try:
            job_kind(job.kind).spec.model_validate(job.spec)  # the stored spec still validates under this code
        except ValidationError as e:
            self.store.transition(job.id, S.FAILED, "spec no longer valid: " + "; ".join(field_errors(e.errors())))
            return
        self.store.transition(job.id, S.QUEUED, "accepted by the controller")

    def _start_attempt(self, job: JobRecord) -> None:
        paths = job_paths(self.settings.job_root, job.id)
        paths.write_spec(job.spec)
        reason = "submitting to Ray" if job.attempts == 0 else f"submitting attempt {job.attempts + 1}"
        job = self.store.transition(job.id, S.STARTING, reason, new_attempt=True)
        self.fault_hook("before_submit")
        self._submit(job)

    def _submit(self, job: JobRecord) -> None:
        attempt = job.current_attempt
        if self.ray.status(attempt.submission_id) is None:
            paths = job_paths(self.settings.job_root, job.id)
            if not paths.spec.exists():
                paths.write_spec(job.spec)
            try:
                self.ray.submit(
                    submission_id=attempt.submission_id,
                    entrypoint=build_entrypoint(job.kind, paths, self.settings.job_python, self.entrypoints),
                    runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", "ORCH_JOB_ID": job.id,
                                              "ORCH_ATTEMPT": str(attempt.number)}},
                    metadata={"orch_job_id": job.id, "orch_attempt": str(attempt.number)},
                    entrypoint_resources=dict(self.settings.driver_resources),
                )
            except RayRefused as e:
                self.store.update_attempt(job.id, attempt.number, ended_at=time.time(), ray_message=str(e))
                self.store.transition(job.id, S.FAILED, f"Ray refused the submission: {e}")
                return
            self.telemetry.ray_submissions.inc()
        # Submitted now, or by a process that died before recording it.
        self.store.update_attempt(job.id, attempt.number, submitted_at=time.time(), ray_status="PENDING")

    def _observe(self, job: JobRecord) -> None:
        attempt = job.current_attempt
        view = self.ray.status(attempt.submission_id)
        if view is None:
            self._lost(job, f"attempt {attempt.number} lost: Ray no longer knows {attempt.submission_id} "
                            "(cluster restarted?)")
            return
        if view.status != attempt.ray_status:
            self.store.update_attempt(job.id, attempt.number, ray_status=view.status, ray_message=view.message)
        if view.status == "RUNNING":
            if job.state is S.STARTING:
                self.store.transition(job.id, S.RUNNING, "Ray: driver running")
            self._read_metrics(job, attempt.submission_id)
        elif view.terminal:
            self._finished(job, view)

    def _finished(self, job: JobRecord, view: RayJobView) -> None:
        number = job.current_attempt.number
        self.store.update_attempt(job.id, number, ended_at=time.time(), ray_status=view.status,
                                  ray_message=view.message, exit_code=view.exit_code)
        self._read_metrics(job, view.submission_id, final=True)
        if view.status == "SUCCEEDED":
            self.store.transition(job.id, S.SUCCEEDED, "Ray: driver exited 0")
        elif view.status == "STOPPED":
            self.store.transition(job.id, S.CANCELLED, "Ray job stopped outside the control plane")
        elif _retryable(view):
            self._lost(job, f"attempt {number} driver died: {view.error_type or f'exit code {view.exit_code}'}")
        else:
            code = f" (exit code {view.exit_code})" if view.exit_code is not None else ""
            self.store.transition(job.id, S.FAILED, f"Ray: {view.message or 'driver failed'}{code}"[:1000])

    def _lost(self, job: JobRecord, reason: str) -> None:
        self._clear_stall(job.id)
        retries_used = job.attempts - 1
        if retries_used < job.max_retries:
            self.telemetry.retries.inc()
            self.store.transition(job.id, S.RETRYING, f"{reason}; retry {retries_used + 1} of {job.max_retries}")
        else:
            self.store.transition(job.id, S.FAILED, f"{reason}; no retries left (max_retries={job.max_retries})")

    def _cancel(self, job: JobRecord) -> None:
        attempt = job.current_attempt
        if job.state in (S.PENDING, S.QUEUED, S.RETRYING) or attempt is None:
            self.store.transition(job.id, S.CANCELLED, "cancelled by user before it reached Ray")
            return
        view = self.ray.status(attempt.submission_id)
        if view is None:
            # Stored but never submitted (or the cluster forgot it): nothing runs.
            self.store.update_attempt(job.id, attempt.number, ended_at=time.time())
            self.store.transition(job.id, S.CANCELLED, "cancelled by user; Ray had no job to stop")
        elif not view.terminal:
            if view.status == "RUNNING" and not self._checkpointed_before_stop(job):
                return  # a later pass stops it, once the loop has checkpointed or the wait is over
            # Asynchronous in Ray: a later pass sees STOPPED. A job Ray still holds PENDING (its
            # driver not yet scheduled) keeps the stop queued until it is; after the grace we stop
            # waiting for Ray to confirm, and say so.
            first = self._stop_sent_at.setdefault(job.id, self.clock())
            self.ray.stop(attempt.submission_id)
            if view.status == "PENDING" and self.clock() - first >= self.settings.cancel_grace_s:
                self._stop_sent_at.pop(job.id, None)
                self.store.update_attempt(job.id, attempt.number, ray_status=view.status, ray_message=view.message)
                self.store.transition(job.id, S.CANCELLED, "cancelled by user; Ray still held the job PENDING, "
                                                           "its stop is queued until the driver is scheduled")
        else:
            self._stop_sent_at.pop(job.id, None)
            self.store.update_attempt(job.id, attempt.number, ended_at=time.time(), ray_status=view.status,
                                      ray_message=view.message, exit_code=view.exit_code)
            if view.status == "SUCCEEDED":
                self._read_metrics(job, view.submission_id, final=True)
                self.store.transition(job.id, S.SUCCEEDED, "finished before the cancel took effect")
            else:
                self._clear_stall(job.id)
                note = self._stop_notes.pop(job.id, None)
                self.store.transition(job.id, S.CANCELLED, f"cancelled by user; {note + '; ' if note else ''}"
                                                           f"Ray job {view.status}")

    def _checkpointed_before_stop(self, job: JobRecord) -> bool:
        """Whether a running job may be stopped now: the first pass asks its loop for a checkpoint
        (workers/control.py), later passes wait for the confirmation, at most stop_checkpoint_timeout_s.
        Ray Jobs gives a stopping driver 3 s before SIGKILL, so without this up to a checkpoint
        interval of steps would be lost."""
        channel = ControlChannel(job_paths(self.settings.job_root, job.id).out)
        asked = self._checkpoint_asked.get(job.id)
        if asked is None:
            asked = self._checkpoint_asked[job.id] = (channel.request_checkpoint("cancelled by user"), self.clock())
        request, at = asked
        done = channel.confirmation(request)
        if done is None and self.clock() - at < self.settings.stop_checkpoint_timeout_s:
            return False
        self._checkpoint_asked.pop(job.id, None)
        self._stop_notes[job.id] = (f"checkpoint at step {done.step} first" if done else
                                    f"no checkpoint confirmed within {self.settings.stop_checkpoint_timeout_s:.0f} s")
        return True

    # -- metrics ----------------------------------------------------------------------------------

    def _read_metrics(self, job: JobRecord, submission_id: str, final: bool = False) -> None:
        now = self.clock()
        last = self._metrics_read_at.get(job.id)
        if not final and last is not None and now - last < self.settings.metrics_interval_s:
            return
        self._metrics_read_at[job.id] = now
        latest = latest_progress(self.ray.logs(submission_id))
        metrics = _unstalled({**(job.metrics or {}), **(latest or {})})
        if final:
            metrics.update(read_summary(job_paths(self.settings.job_root, job.id).summary))
            self._metrics_read_at.pop(job.id, None)
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

    def _clear_stall(self, job_id: str) -> None:
        """Drop the stall mark of an attempt that ended without a final metrics read (lost, stopped)."""
        metrics = self.store.get(job_id).metrics or {}
        if not STALL_KEYS.isdisjoint(metrics):
            self.store.set_metrics(job_id, _unstalled(metrics))

    # -- running it -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now (after a submit or a cancel) instead of at the next interval."""
        self._wake.set()

    def start(self) -> None:
        self._take_lock()
        self._thread = threading.Thread(target=self._loop, name="orch-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _loop(self) -> None:
        log.info("controller started; reconciling every %.1f s", self.settings.reconcile_interval_s)
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.reconcile_once()
            except Exception:  # a store error must not end the loop; the next pass tries again
                self.telemetry.reconcile_errors.labels("internal").inc()
                log.exception("reconcile pass failed")
            self._wake.wait(self.settings.reconcile_interval_s)

    def _take_lock(self) -> None:
        """One controller per state dir: an flock the kernel drops when the process dies (even SIGKILL)."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.state_dir / "controller.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControllerBusy(f"another controller holds {path}") from None
        self._lock_fd = fd


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
