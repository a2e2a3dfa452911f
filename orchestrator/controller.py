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

Scheduling: QUEUED jobs and deployments are admitted by the scheduler (orchestrator/scheduler/) once
per pass, after every job moved; a preempted job goes RUNNING -> PREEMPTING (its loop checkpoints, Ray
stops it) -> QUEUED, its next attempt resuming from that checkpoint. Waiting demand is shown to the
autoscaler (orchestrator/demand_groups.py), withdrawn before an admitted attempt is submitted.

Resize: a user's ``PATCH /v1/jobs/{id}`` stores the spec at the new size (``resize_spec``); a RUNNING
job then goes RUNNING -> RESIZING (checkpoint now, stop, as a preemption) -> QUEUED, the new spec
stored in the same transaction, and the scheduler admits it again with its new demand; the next
attempt resumes from that checkpoint with the same --out. Neither uses up ``max_retries``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from pydantic import ValidationError

from jobs.elastic import describe_size
from jobs.kinds import job_kind
from jobs.specs import field_errors
from orchestrator.demand_groups import DemandSink, cpu_bundles, demand_group, demand_sink
from orchestrator.entrypoints import ALLOWED_ENTRYPOINTS, build_entrypoint, confinement_env, job_paths
from orchestrator.observe import AttemptReader, failure_reason, latest_progress  # noqa: F401 (re-exported)
from orchestrator.ray_client import RayJobs, RayJobView, RayRefused, RayUnavailable
from orchestrator.scheduler.schedule import Decisions, Policies
from orchestrator.scheduler.service import Scheduler
from orchestrator.settings import Settings
from orchestrator.states import IllegalTransition, JobState
from orchestrator.stop_checkpoint import StopCheckpoints
from orchestrator.store import JobRecord, JobStore
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
S = JobState

# Ray error types that mean the driver died from outside the job, so a new attempt may succeed.
RETRYABLE_RAY_ERRORS = frozenset({
    "JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE", "JOB_SUPERVISOR_ACTOR_START_FAILURE",
})


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
                 fault_hook: Callable[[str], None] = no_fault, policies: Policies | None = None,
                 demand: DemandSink | None = None):
        self.store = store
        self.ray = ray
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.entrypoints = entrypoints
        self.clock = clock
        self.fault_hook = fault_hook
        self.ray_reachable: bool | None = None
        self.last_pass_at: float | None = None
        self.reader = AttemptReader(store, ray, settings, self.telemetry, lambda: self.clock())
        self.scheduler = Scheduler(settings, policies)
        self.demand = demand or demand_sink(settings)
        self._stop_sent_at: dict[str, float] = {}
        self.stop_checkpoints = StopCheckpoints(settings, lambda: self.clock())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # -- one pass ---------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        self.telemetry.reconciles.inc()
        jobs = self.store.unfinished()
        self.reader.keep_only(job.id for job in jobs if job.state is S.RUNNING)
        try:
            for job in jobs:
                self._guarded(job, self._reconcile)
            self._schedule(jobs)
            self.ray_reachable = True
        except RayUnavailable as e:
            # Nothing can be learned this pass; every job keeps its state until Ray answers.
            self.telemetry.reconcile_errors.labels("ray_unavailable").inc()
            if self.ray_reachable is not False:
                log.warning("%s", e)
            self.ray_reachable = False
        self.telemetry.ray_reachable.set(1 if self.ray_reachable else 0)
        self.telemetry.jobs_stalled.set(self.reader.stalled)
        self.telemetry.running_metrics = {j.id: j.metrics or {} for j in jobs if j.state is S.RUNNING}
        self.telemetry.scheduling = self.scheduler.snapshot
        self.last_pass_at = time.time()

    def _guarded(self, job: JobRecord, step: Callable[[JobRecord], None]) -> None:
        """Run one job's step; one job's trouble (a full disk, a bad row) must not stall the others."""
        try:
            step(job)
        except RayUnavailable:
            raise
        except (IllegalTransition, RayRefused) as e:
            self.telemetry.reconcile_errors.labels("job").inc()
            log.warning("job %s: %s", job.id, e)
        except Exception:
            self.telemetry.reconcile_errors.labels("job").inc()
            log.exception("job %s: reconcile failed", job.id)

    def _reconcile(self, job: JobRecord) -> None:
        """Move one job one step (QUEUED jobs wait for the scheduling step)."""
        if job.cancel_requested:
            self._cancel(job)
        elif job.state is S.PENDING:
            self._accept(job)
        elif job.state is S.RETRYING:
            self._start_attempt(job)
        elif job.state is S.STARTING and job.current_attempt.submitted_at is None:
            self._submit(job)
        elif job.state is S.RUNNING and job.resize_spec is not None:
            self._resize(job)
        elif job.state in (S.STARTING, S.RUNNING):
            self._observe(job)
        elif job.state is S.PREEMPTING:
            self._preempting(job)
        elif job.state is S.RESIZING:
            self._resizing(job)

    def _schedule(self, jobs: list[JobRecord]) -> None:
        """Admit, queue and preempt by one scheduler pass over the jobs as this pass first read them and
        every stored deployment (whose reconciler deploys only what this pass admitted)."""
        quotas = {name: team.quotas for name, team in self.store.teams().items() if team.quotas}
        decisions = self.scheduler.plan(jobs, self.ray, quotas, self.store.deployments()[0])
        by_id = {job.id: job for job in jobs}
        for victim in decisions.preempt:
            self._guarded(by_id[victim.job_id], lambda job, v=victim: self._preempt(job, v.reason))
        # Before any admitted attempt is submitted: its demand group would hold the room it gets.
        groups = {w.job_id: self._demand_group(by_id[w.job_id]) for w in decisions.wait if w.needs_room}
        queued = {v.id: v.demand for v in self.scheduler.snapshot.queued}  # deployments' too
        groups |= {w.job_id: demand_group(cpu_bundles(queued[w.job_id]), {})
                   for w in decisions.serving_wait if w.needs_room}
        self.demand.publish(groups)
        for admit in decisions.admit:
            self._guarded(by_id[admit.job_id], self._start_attempt)
        self._record_queue(decisions, by_id)
        self.store.record_deployment_queue([a.job_id for a in decisions.serving_admit],
                                           [(w.job_id, w.reason) for w in decisions.serving_wait])

    def _demand_group(self, job: JobRecord):
        kind = job_kind(job.kind)
        return demand_group(kind.demand(kind.spec.model_validate(job.spec)), self.settings.driver_resources)

    def _record_queue(self, decisions: Decisions, by_id: dict[str, JobRecord]) -> None:
        """Store each waiting job's position and reason, and clear them on admitted ones; only changes
        are written (a queue of thousands stays one small transaction per pass)."""
        entries = [(a.job_id, None, None) for a in decisions.admit]
        entries += [(w.job_id, w.position, w.reason) for w in decisions.wait]
        changed = [(i, p, r) for i, p, r in entries if (by_id[i].queue_position, by_id[i].queue_reason) != (p, r)]
        if changed:
            self.store.set_queue_many(changed)

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
                                              "ORCH_ATTEMPT": str(attempt.number),
                                              **confinement_env(job.team, self.store.team(job.team).roots, paths.root)}},
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
            self.reader.read(job, attempt.submission_id)
        elif view.terminal:
            self._finished(job, view)

    def _finished(self, job: JobRecord, view: RayJobView) -> None:
        number = job.current_attempt.number
        self.store.update_attempt(job.id, number, ended_at=time.time(), ray_status=view.status,
                                  ray_message=view.message, exit_code=view.exit_code)
        self.reader.read(job, view.submission_id, final=True)
        if view.status == "SUCCEEDED":
            self.store.transition(job.id, S.SUCCEEDED, "Ray: driver exited 0")
        elif view.status == "STOPPED":
            self.store.transition(job.id, S.CANCELLED, "Ray job stopped outside the control plane")
        elif _retryable(view):
            self._lost(job, f"attempt {number} driver died: {view.error_type or f'exit code {view.exit_code}'}")
        else:
            self.store.transition(job.id, S.FAILED, failure_reason(job.id, view))

    def _lost(self, job: JobRecord, reason: str) -> None:
        self.reader.clear_stall(job.id)
        retries_used = job.retries_used  # attempts after a preemption or a resize are not retries
        if retries_used < job.max_retries:
            self.telemetry.retries.inc()
            self.store.transition(job.id, S.RETRYING, f"{reason}; retry {retries_used + 1} of {job.max_retries}")
        else:
            self.store.transition(job.id, S.FAILED, f"{reason}; no retries left (max_retries={job.max_retries})")

    # -- preemption -------------------------------------------------------------------------------

    def _preempt(self, job: JobRecord, reason: str) -> None:
        """Start preempting a RUNNING job: recorded in its history and the audit log; the stop itself
        comes in later passes (``_preempting``), after its checkpoint."""
        self.store.transition(job.id, S.PREEMPTING, reason)
        job = self.store.add_preemption(job.id)
        self.store.audit("scheduler", "preempt", job.id, f"{reason}; preemption {job.preemptions}", team=job.team)
        self.telemetry.preemptions.inc()
        log.info("job %s: %s", job.id, reason)
        self._preempting(job)

    def _preempting(self, job: JobRecord) -> None:
        self._stop_then_queue(job, f"preempted: {job.message}",
                              "preempted ({note}); waits to resume from its latest checkpoint")

    # -- resize -----------------------------------------------------------------------------------

    def _resize(self, job: JobRecord) -> None:
        """Start a resize a user asked for (``resize_spec``) of a RUNNING job; the stop comes in later
        passes (``_resizing``), after its checkpoint."""
        reason = f"resizing from {describe_size(job.spec)} to {describe_size(job.resize_spec)}"
        job = self.store.transition(job.id, S.RESIZING, reason)
        log.info("job %s: %s", job.id, reason)
        self._resizing(job)

    def _resizing(self, job: JobRecord) -> None:
        target = describe_size(job.resize_spec) if job.resize_spec else "its new size"
        self._stop_then_queue(job, job.message or "resizing",
                              f"resized ({{note}}); waits to restart on {target} from its latest checkpoint")

    def _stop_then_queue(self, job: JobRecord, why: str, queued_reason: str) -> None:
        """Checkpoint now, stop, then back to QUEUED (``queued_reason`` with ``{note}``: what the stop's
        checkpoint did); the next attempt resumes from the checkpoint. A driver that died meanwhile
        was being stopped anyway: QUEUED too."""
        attempt = job.current_attempt
        view = self.ray.status(attempt.submission_id)
        if view is not None and not view.terminal:
            if view.status == "RUNNING" and not self.stop_checkpoints.ready(job.id, attempt.submission_id, why, job.kind):
                return
            self.ray.stop(attempt.submission_id)
            return
        if view is not None and not (view.status == "STOPPED" or _retryable(view)):
            self._finished(job, view)  # it ended on its own before the stop: SUCCEEDED or its own failure
            return
        self.store.update_attempt(job.id, attempt.number, ended_at=time.time(),
                                  ray_status=view.status if view else None, exit_code=view.exit_code if view else None)
        self.reader.clear_stall(job.id)
        note = self.stop_checkpoints.note(job.id) or "stopped"
        self.store.transition(job.id, S.QUEUED, queued_reason.format(note=note))

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
            why = "cancelled by user"
            if view.status == "RUNNING" and not self.stop_checkpoints.ready(job.id, attempt.submission_id, why, job.kind):
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
                self.reader.read(job, view.submission_id, final=True)
                self.store.transition(job.id, S.SUCCEEDED, "finished before the cancel took effect")
            else:
                self.reader.clear_stall(job.id)
                note = self.stop_checkpoints.note(job.id)
                self.store.transition(job.id, S.CANCELLED, f"cancelled by user; {note + '; ' if note else ''}"
                                                           f"Ray job {view.status}")

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
        self.demand.close()
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
