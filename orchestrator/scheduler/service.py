"""The controller's scheduling step: job records -> views -> one pass -> decisions, with the
bookkeeping that outlives a pass (demands, placements, the last pools and decisions).

Admission happens only here, inside the controller's single pass: concurrent API submits only store
PENDING jobs, so a team's quota cannot be overrun by two requests racing each other.
The last snapshot serves ``GET /v1/cluster`` (reserved, queued demand), ``/metrics`` and the
submit-time refusal of jobs that can never fit, without another call to Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.demand import Demand, job_demand
from jobs.elastic import SPEC_MAX_WORKERS
from jobs.kinds import job_kind
from jobs.specs import TrainSpec
from orchestrator.ray_client import RayJobs, UnmanagedJob
from orchestrator.scheduler.pools import Pool, build_pools, never_fits
from orchestrator.scheduler.schedule import Decisions, Policies, Quotas, schedule_pass
from orchestrator.scheduler.views import JobView
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE, JobState
from orchestrator.store import JobRecord

S = JobState


@dataclass(frozen=True)
class Snapshot:
    """What the last pass saw and decided."""
    pools: dict[str, Pool]
    unmanaged: list[UnmanagedJob]
    decisions: Decisions
    queued: list[JobView] = field(default_factory=list)  # waiting jobs, with their demand and priority


class Scheduler:
    def __init__(self, settings: Settings, policies: Policies | None = None):
        self.settings = settings
        self.policies = policies or Policies()
        # job id -> (its spec's resources as JSON, its demand): recomputed when a resize changed the spec
        self._demand: dict[str, tuple[str, Demand]] = {}
        self._placement: dict[str, dict[str, str]] = {}  # admitted job id -> demand key -> pool
        self.snapshot: Snapshot | None = None

    def demand(self, job: JobRecord) -> Demand:
        """What ``job`` holds or asks for. Its spec changes only by a resize, which stores the new size
        as the job returns to QUEUED (or at once while it waits): an admitted job's demand is the one
        it was admitted with."""
        key = json.dumps(job.spec.get("resources"), sort_keys=True)
        cached = self._demand.get(job.id)
        if cached is None or cached[0] != key:
            cached = self._demand[job.id] = (key, self.demand_of(job.kind, job.spec))
        return cached[1]

    def demand_of(self, kind: str, spec: Mapping[str, Any]) -> Demand:
        return job_demand(job_kind(kind).spec.model_validate(spec), self.settings.driver_resources)

    def refusal(self, kind: str, spec: Mapping[str, Any]) -> str | None:
        """Why a job can never run on this cluster, even at the autoscaler's maximum (None: it can, or
        no pass has reached Ray yet, so nothing is known)."""
        if self.snapshot is None or not self.snapshot.pools:
            return None  # nothing seen yet (or Ray listed no node): never refuse on no knowledge
        why = never_fits(self.demand_of(kind, spec), self.snapshot.pools)
        return f"the job can never run on this cluster: {why}" if why else None

    def largest_size(self, spec: TrainSpec) -> int | None:
        """The most workers (a multiple of expert_parallel) ``spec``'s job could ever run on, its
        pool at the autoscaler's maximum; None before a pass has seen the cluster or for a job
        spanning pools (its new counts are checked whole, by ``refusal``)."""
        if self.snapshot is None or spec.resources.pools:
            return None
        ep = spec.resources.expert_parallel

        def fits(n: int) -> bool:
            sized = spec.model_copy(update={"resources": spec.resources.model_copy(update={"num_workers": n})})
            return never_fits(job_demand(sized, self.settings.driver_resources), self.snapshot.pools) is None

        if not fits(ep):
            return None
        low, high = 1, SPEC_MAX_WORKERS // ep  # in groups of ep workers; fits(low * ep) holds
        while low < high:  # demand grows with the size: the largest fitting count by bisection
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid * ep) else (low, mid - 1)
        return low * ep

    def plan(self, jobs: Sequence[JobRecord], ray: RayJobs, quotas: Quotas) -> Decisions:
        """One pass over ``jobs`` (every unfinished job, as read at the start of the controller's pass)."""
        pools = build_pools(ray.nodes(), unmanaged := ray.unmanaged_jobs(), self.settings.autoscaler_max_extra)
        self.forget_except(j.id for j in jobs)
        queued, admitted, preempting = [], [], []
        for job in jobs:
            if job.state is S.QUEUED and not job.cancel_requested:
                queued.append(self._view(job, pools))
            elif job.state in ACTIVE:
                (preempting if job.state is S.PREEMPTING else admitted).append(self._view(job, pools))
        decisions = schedule_pass(pools, queued, admitted, preempting, quotas=quotas,
                                  max_active=self.settings.max_active_jobs, policies=self.policies)
        for admit in decisions.admit:
            self._placement[admit.job_id] = admit.placement
        waiting = {w.job_id for w in decisions.wait}
        self.snapshot = Snapshot(pools, unmanaged, decisions, [v for v in queued if v.id in waiting])
        return decisions

    def _view(self, job: JobRecord, pools: Mapping[str, Pool]) -> JobView:
        demand = self.demand(job)
        placement = {}
        if job.state in ACTIVE:
            placement = self._placement.get(job.id) or self._rebook(demand, pools)
            self._placement[job.id] = placement
        else:
            self._placement.pop(job.id, None)  # back in the queue (preempted): booked anew when admitted
        return JobView(job.id, job.team, job.priority, job.created_at, demand, placement,
                       preemptible=job.state is S.RUNNING)

    def _rebook(self, demand: Demand, pools: Mapping[str, Pool]) -> dict[str, str]:
        """A placement for a job admitted before this process started: where it would go on an empty
        cluster (bookkeeping only; Ray placed it already)."""
        placed = self.policies.placement.place(demand, {p: pool.capacity for p, pool in pools.items()})
        return placed or {}

    def forget_except(self, job_ids: Iterable[str]) -> None:
        keep = set(job_ids)
        for book in (self._demand, self._placement):
            for gone in book.keys() - keep:
                del book[gone]
