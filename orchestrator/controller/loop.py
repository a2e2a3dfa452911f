"""The controller's reconcile loop: stored intent -> Ray Jobs API, one pass at a time (each job's move
is steps.py's; the thread is orchestrator/reconcile.py's).

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
autoscaler (orchestrator/controller/demand_groups.py), withdrawn before an admitted attempt is submitted.

Resize: a user's ``PATCH /v1/jobs/{id}`` stores the spec at the new size (``resize_spec``); a RUNNING
job then goes RUNNING -> RESIZING (checkpoint now, stop, as a preemption) -> QUEUED, the new spec
stored in the same transaction, and the scheduler admits it again with its new demand; the next
attempt resumes from that checkpoint with the same --out. Neither uses up ``max_retries``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable

from jobs.kinds import job_kind
from orchestrator.controller.demand_groups import DemandSink, cpu_bundles, demand_group, demand_sink
from orchestrator.controller.entrypoints import ALLOWED_ENTRYPOINTS
from orchestrator.controller.steps import JobSteps
from orchestrator.ray_client import RayJobs, RayRefused, RayUnavailable
from orchestrator.reconcile import ReconcileLoop
from orchestrator.scheduler.schedule import Decisions, Policies
from orchestrator.scheduler.service import Scheduler
from orchestrator.settings import Settings
from orchestrator.states import IllegalTransition, JobState
from orchestrator.store import JobRecord, Store
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
S = JobState
STOP_TIMEOUT_S = 30.0  # how long stopping the controller waits for a pass in progress


class ControllerBusy(RuntimeError):
    """Another controller process holds this state dir's lock."""


def no_fault(point: str) -> None:
    """The default ``fault_hook``: every named point passes."""


class Controller(ReconcileLoop):
    """``fault_hook`` is called with the name of each point where a crash matters to correctness
    ("before_submit": the attempt is stored, Ray not yet called); a test injects one that kills the
    process there, and checks that the next controller recovers."""

    thread_name = "orch-controller"
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, store: Store, ray: RayJobs, settings: Settings, telemetry: Telemetry | None = None,
                 entrypoints: dict[str, str] = ALLOWED_ENTRYPOINTS, clock=time.monotonic,
                 fault_hook: Callable[[str], None] = no_fault, policies: Policies | None = None,
                 demand: DemandSink | None = None):
        super().__init__()
        self.store = store
        self.ray = ray
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.clock = clock
        self.fault_hook = fault_hook
        self.ray_reachable: bool | None = None
        self.last_pass_at: float | None = None
        self.steps = JobSteps(store, ray, settings, self.telemetry, entrypoints, lambda: self.clock(),
                              lambda point: self.fault_hook(point))
        self.scheduler = Scheduler(settings, policies)
        self.demand = demand or demand_sink(settings)
        self._lock_fd: int | None = None

    @property
    def interval_s(self) -> float:  # type: ignore[override]
        return self.settings.reconcile_interval_s

    # -- one pass ---------------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        self.telemetry.reconciles.inc()
        jobs = self.store.jobs.unfinished()
        reader = self.steps.reader
        reader.keep_only(job.id for job in jobs if job.state is S.RUNNING)
        try:
            for job in jobs:
                self._guarded(job, self.steps.step)
            self._schedule(jobs)
            self.ray_reachable = True
        except RayUnavailable as e:
            # Nothing can be learned this pass; every job keeps its state until Ray answers.
            self.telemetry.reconcile_errors.labels("ray_unavailable").inc()
            if self.ray_reachable is not False:
                log.warning("%s", e)
            self.ray_reachable = False
        self.telemetry.ray_reachable.set(1 if self.ray_reachable else 0)
        self.telemetry.jobs_stalled.set(reader.stalled)
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

    def _schedule(self, jobs: list[JobRecord]) -> None:
        """Admit, queue and preempt by one scheduler pass over the jobs as this pass first read them and
        every stored deployment (whose reconciler deploys only what this pass admitted)."""
        quotas = {name: team.quotas for name, team in self.store.teams.all().items() if team.quotas}
        decisions = self.scheduler.plan(jobs, self.ray, quotas, self.store.deployments.list()[0])
        by_id = {job.id: job for job in jobs}
        for victim in decisions.preempt:
            self._guarded(by_id[victim.job_id], lambda job, v=victim: self.steps.preempt(job, v.reason))
        # Before any admitted attempt is submitted: its demand group would hold the room it gets.
        groups = {w.job_id: self._demand_group(by_id[w.job_id]) for w in decisions.wait if w.needs_room}
        queued = {v.id: v.demand for v in self.scheduler.snapshot.queued}  # deployments' too
        groups |= {w.job_id: demand_group(cpu_bundles(queued[w.job_id]), {})
                   for w in decisions.serving_wait if w.needs_room}
        self.demand.publish(groups)
        for admit in decisions.admit:
            self._guarded(by_id[admit.job_id], self.steps.start_attempt)
        self._record_queue(decisions, by_id)
        self.store.deployments.record_queue([a.job_id for a in decisions.serving_admit],
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
            self.store.jobs.set_queue_many(changed)

    # -- running it -------------------------------------------------------------------------------

    def start(self) -> None:
        self._take_lock()
        log.info("controller started; reconciling every %.1f s", self.settings.reconcile_interval_s)
        super().start()

    def stop(self) -> None:
        super().stop()
        self.demand.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def pass_failed(self, error: Exception) -> None:
        """A store error must not end the loop; the next pass tries again."""
        self.telemetry.reconcile_errors.labels("internal").inc()
        super().pass_failed(error)

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
