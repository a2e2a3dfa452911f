"""One job's next move, as the controller's pass asks for it (orchestrator/controller/loop.py): accept,
start an attempt and submit it, observe it, finish it, retry it, and stop it for a preemption, a
resize or a cancel (checkpoint now, then stop). Each move reads the job as stored and writes its
next state through the store's one transition point; Ray is asked, never assumed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from jobs.contracts.elastic import describe_size
from jobs.kinds import job_kind
from jobs.specs.base import field_errors
from orchestrator.controller.entrypoints import build_entrypoint, confinement_env, job_paths
from orchestrator.controller.observe import AttemptReader, failure_reason
from orchestrator.controller.stop_checkpoint import StopCheckpoints
from orchestrator.ray_client import RayJobs, RayJobView, RayRefused
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import JobRecord, Store
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
S = JobState

# Ray error types that mean the driver died from outside the job, so a new attempt may succeed.
RETRYABLE_RAY_ERRORS = frozenset({
    "JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE", "JOB_SUPERVISOR_ACTOR_START_FAILURE",
})


def _retryable(view: RayJobView) -> bool:
    if view.error_type in RETRYABLE_RAY_ERRORS:
        return True
    # Killed by a signal: Popen reports -N, a shell that did not exec reports 128+N.
    return view.exit_code is not None and (view.exit_code < 0 or view.exit_code > 128)


class JobSteps:
    """``clock`` and ``fault_hook`` are read through the controller at each call (a test swaps them on a
    running controller); ``fault_hook`` names each point where a crash matters to correctness."""

    def __init__(self, store: Store, ray: RayJobs, settings: Settings, telemetry: Telemetry,
                 entrypoints: dict[str, str], clock: Callable[[], float], fault_hook: Callable[[str], None]):
        self.store, self.ray, self.settings, self.telemetry = store, ray, settings, telemetry
        self.entrypoints = entrypoints
        self.clock = clock
        self.fault_hook = fault_hook
        self.reader = AttemptReader(store, ray, settings, telemetry, clock)
        self.stop_checkpoints = StopCheckpoints(settings, clock)
        self._stop_sent_at: dict[str, float] = {}

    def step(self, job: JobRecord) -> None:
        """Move one job one step (QUEUED jobs wait for the scheduling step)."""
        if job.cancel_requested:
            self._cancel(job)
        elif job.state is S.PENDING:
            self._accept(job)
        elif job.state is S.RETRYING:
            self.start_attempt(job)
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

    def _accept(self, job: JobRecord) -> None:
        try:
            job_kind(job.kind).spec.model_validate(job.spec)  # the stored spec still validates under this code
        except ValidationError as e:
            self.store.jobs.transition(job.id, S.FAILED, "spec no longer valid: " + "; ".join(field_errors(e.errors())))
            return
        self.store.jobs.transition(job.id, S.QUEUED, "accepted by the controller")

    def start_attempt(self, job: JobRecord) -> None:
        paths = job_paths(self.settings.job_root, job.id)
        paths.write_spec(job.spec)
        reason = "submitting to Ray" if job.attempts == 0 else f"submitting attempt {job.attempts + 1}"
        job = self.store.jobs.transition(job.id, S.STARTING, reason, new_attempt=True)
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
                                              **confinement_env(job.team, self.store.teams.get(job.team).roots,
                                                                paths.root)}},
                    metadata={"orch_job_id": job.id, "orch_attempt": str(attempt.number)},
                    entrypoint_resources=dict(self.settings.driver_resources),
                )
            except RayRefused as e:
                self.store.jobs.update_attempt(job.id, attempt.number, ended_at=time.time(), ray_message=str(e))
                self.store.jobs.transition(job.id, S.FAILED, f"Ray refused the submission: {e}")
                return
            self.telemetry.ray_submissions.inc()
        # Submitted now, or by a process that died before recording it.
        self.store.jobs.update_attempt(job.id, attempt.number, submitted_at=time.time(), ray_status="PENDING")

    def _observe(self, job: JobRecord) -> None:
        attempt = job.current_attempt
        view = self.ray.status(attempt.submission_id)
        if view is None:
            self._lost(job, f"attempt {attempt.number} lost: Ray no longer knows {attempt.submission_id} "
                            "(cluster restarted?)")
            return
        if view.status != attempt.ray_status:
            self.store.jobs.update_attempt(job.id, attempt.number, ray_status=view.status, ray_message=view.message)
        if view.status == "RUNNING":
            if job.state is S.STARTING:
                self.store.jobs.transition(job.id, S.RUNNING, "Ray: driver running")
            self.reader.read(job, attempt.submission_id)
        elif view.terminal:
            self._finished(job, view)

    def _finished(self, job: JobRecord, view: RayJobView) -> None:
        number = job.current_attempt.number
        self.store.jobs.update_attempt(job.id, number, ended_at=time.time(), ray_status=view.status,
                                       ray_message=view.message, exit_code=view.exit_code)
        self.reader.read(job, view.submission_id, final=True)
        if view.status == "SUCCEEDED":
            self.store.jobs.transition(job.id, S.SUCCEEDED, "Ray: driver exited 0")
        elif view.status == "STOPPED":
            self.store.jobs.transition(job.id, S.CANCELLED, "Ray job stopped outside the control plane")
        elif _retryable(view):
            self._lost(job, f"attempt {number} driver died: {view.error_type or f'exit code {view.exit_code}'}")
        else:
            self.store.jobs.transition(job.id, S.FAILED, failure_reason(job.id, view))

    def _lost(self, job: JobRecord, reason: str) -> None:
        self.reader.clear_stall(job.id)
        retries_used = job.retries_used  # attempts after a preemption or a resize are not retries
        if retries_used < job.max_retries:
            self.telemetry.retries.inc()
            self.store.jobs.transition(job.id, S.RETRYING, f"{reason}; retry {retries_used + 1} of {job.max_retries}")
        else:
            self.store.jobs.transition(job.id, S.FAILED, f"{reason}; no retries left (max_retries={job.max_retries})")

    # -- preemption -------------------------------------------------------------------------------

    def preempt(self, job: JobRecord, reason: str) -> None:
        """Start preempting a RUNNING job: recorded in its history and the audit log; the stop itself
        comes in later passes (``_preempting``), after its checkpoint."""
        self.store.jobs.transition(job.id, S.PREEMPTING, reason)
        job = self.store.jobs.add_preemption(job.id)
        self.store.audit.record("scheduler", "preempt", job.id, f"{reason}; preemption {job.preemptions}",
                                team=job.team)
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
        job = self.store.jobs.transition(job.id, S.RESIZING, reason)
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
        self.store.jobs.update_attempt(job.id, attempt.number, ended_at=time.time(),
                                       ray_status=view.status if view else None,
                                       exit_code=view.exit_code if view else None)
        self.reader.clear_stall(job.id)
        note = self.stop_checkpoints.note(job.id) or "stopped"
        self.store.jobs.transition(job.id, S.QUEUED, queued_reason.format(note=note))

    def _cancel(self, job: JobRecord) -> None:
        attempt = job.current_attempt
        if job.state in (S.PENDING, S.QUEUED, S.RETRYING) or attempt is None:
            self.store.jobs.transition(job.id, S.CANCELLED, "cancelled by user before it reached Ray")
            return
        view = self.ray.status(attempt.submission_id)
        if view is None:
            # Stored but never submitted (or the cluster forgot it): nothing runs.
            self.store.jobs.update_attempt(job.id, attempt.number, ended_at=time.time())
            self.store.jobs.transition(job.id, S.CANCELLED, "cancelled by user; Ray had no job to stop")
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
                self.store.jobs.update_attempt(job.id, attempt.number, ray_status=view.status, ray_message=view.message)
                self.store.jobs.transition(job.id, S.CANCELLED, "cancelled by user; Ray still held the job PENDING, "
                                                           "its stop is queued until the driver is scheduled")
        else:
            self._stop_sent_at.pop(job.id, None)
            self.store.jobs.update_attempt(job.id, attempt.number, ended_at=time.time(), ray_status=view.status,
                                           ray_message=view.message, exit_code=view.exit_code)
            if view.status == "SUCCEEDED":
                self.reader.read(job, view.submission_id, final=True)
                self.store.jobs.transition(job.id, S.SUCCEEDED, "finished before the cancel took effect")
            else:
                self.reader.clear_stall(job.id)
                note = self.stop_checkpoints.note(job.id)
                self.store.jobs.transition(job.id, S.CANCELLED, f"cancelled by user; {note + '; ' if note else ''}"
                                                           f"Ray job {view.status}")
