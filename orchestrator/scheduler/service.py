"""The controller's scheduling step: job records -> views -> one pass -> decisions, with the
bookkeeping that outlives a pass (demands, placements, the last pools and decisions).

Admission happens only here, inside the controller's single pass: concurrent API submits only store
PENDING jobs, so a team's quota cannot be overrun by two requests racing each other.
The last snapshot serves ``GET /v1/cluster`` (reserved, queued demand, each team's holdings),
``/metrics`` and the submit-time refusal of jobs and deployments that can never fit, without
another call to Ray.

Serving deployments share this one accounting. Their replicas run on Ray Serve for as long as the
deployment is stored, so the pass takes every stored deployment too (``plan(..., deployments)``):
one that ``holds`` (admitted, not given up) is an admitted view holding its booking, a QUEUED one is
queued like a job, admitted or kept waiting with a reason (``Decisions.serving_admit`` and
``serving_wait``, which the controller records with ``store.deployments.record_queue``). The
reconciler (orchestrator/deployments/reconciler.py) deploys only what this pass admitted. A deployment books
its replicas at ``max_replicas`` x ``num_cpus`` (``deployment_demand``): Serve's autoscaler adds
replicas up to the maximum without asking, so only that booking keeps quotas and free capacity true.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.contracts.demand import Demand, job_demand
from jobs.contracts.elastic import SPEC_MAX_WORKERS
from jobs.kinds import job_kind
from jobs.specs.serve import ServeSpec
from jobs.specs.train import TrainSpec
from orchestrator.ray_client import RayJobs, UnmanagedJob
from orchestrator.scheduler.pools import Pool, build_pools, never_fits
from orchestrator.scheduler.schedule import Decisions, Policies, Quotas, schedule_pass
from orchestrator.scheduler.views import JobView
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE, JobState
from orchestrator.store import DeploymentRecord, DeploymentStatus, JobRecord

S = JobState
SERVING_PRIORITY = "normal"  # a deployment queues, and may preempt, as a normal-priority job


def serving_key(pools: Mapping[str, Pool]) -> str:
    """Where replicas (CPUs only) are booked: the cpu pools, keeping accelerator nodes' CPUs for their
    workers; on a cluster without one (``orch up --local`` on a GPU workstation), the pool with the
    most CPUs at the autoscaler's maximum, where Ray may well place them."""
    if not pools or any(p.device == "cpu" for p in pools.values()):
        return "cpu"
    return max(pools, key=lambda name: (pools[name].max_capacity.get("CPU", 0.0), name))


def deployment_demand(spec: ServeSpec, key: str = "cpu") -> Demand:
    """What a deployment's replicas hold: ``max_replicas`` x ``num_cpus`` under ``key`` (the serve
    kind's demand, without a driver: the deploy job's driver exits once Serve has the application)."""
    [need] = job_demand(spec).values()  # one key: the serve kind books its replicas in one place
    return {key: need}


@dataclass(frozen=True)
class TeamUsage:
    """What one team holds (Ray resource -> amount, over all pools) by the scheduler's bookings."""
    jobs: dict[str, float] = field(default_factory=dict)  # its admitted jobs
    serving: dict[str, float] = field(default_factory=dict)  # its admitted deployments' replicas
    deployments: int = 0  # deployments holding resources
    queued_deployments: int = 0  # deployments waiting (QUEUED)


@dataclass(frozen=True)
class Snapshot:
    """What the last pass saw and decided."""
    pools: dict[str, Pool]
    unmanaged: list[UnmanagedJob]
    decisions: Decisions
    queued: list[JobView] = field(default_factory=list)  # waiting jobs and deployments, with their demand
    teams: dict[str, TeamUsage] = field(default_factory=dict)


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

    def deployment_refusal(self, spec: ServeSpec) -> tuple[tuple[str, ...], str] | None:
        """Why a deployment of ``spec`` can never run on this cluster (as ``refusal``), with the spec
        field to blame: ``num_cpus`` when one replica fits nowhere, else ``autoscaling.max_replicas``."""
        if self.snapshot is None or not self.snapshot.pools:
            return None
        pools = self.snapshot.pools
        why = never_fits(deployment_demand(spec, serving_key(pools)), pools, "the deployment")
        if why is None:
            return None
        one = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={"max_replicas": 1})})
        one_fits = never_fits(deployment_demand(one, serving_key(pools)), pools) is None
        blame = ("autoscaling", "max_replicas") if one_fits else ("num_cpus",)
        return blame, (f"the deployment can never run on this cluster ({spec.autoscaling.max_replicas} "
                       f"replica(s) of {spec.num_cpus:g} CPU at most): {why}")

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

    def plan(self, jobs: Sequence[JobRecord], ray: RayJobs, quotas: Quotas,
             deployments: Sequence[DeploymentRecord] = ()) -> Decisions:
        """One pass over ``jobs`` (every unfinished job, as read at the start of the controller's pass)
        and every stored deployment."""
        pools = build_pools(ray.nodes(), unmanaged := ray.unmanaged_jobs(), self.settings.autoscaler_max_extra)
        self.forget_except([*(j.id for j in jobs), *(d.id for d in deployments)])
        queued, admitted, preempting = [], [], []
        for job in jobs:
            if job.state is S.QUEUED and not job.cancel_requested:
                queued.append(self._view(job, pools))
            elif job.state in ACTIVE:
                (preempting if job.state is S.PREEMPTING else admitted).append(self._view(job, pools))
        serving = {d.id for d in deployments}
        for d in deployments:
            if d.status is DeploymentStatus.QUEUED:
                queued.append(self._deployment_view(d, pools))
            elif d.holds:
                admitted.append(self._deployment_view(d, pools))
        decisions = schedule_pass(pools, queued, admitted, preempting, quotas=quotas,
                                  max_active=self.settings.max_active_jobs, policies=self.policies)
        for admit in decisions.admit:
            self._placement[admit.job_id] = admit.placement
        decisions.serving_admit = [a for a in decisions.admit if a.job_id in serving]
        decisions.serving_wait = [w for w in decisions.wait if w.job_id in serving]
        decisions.admit = [a for a in decisions.admit if a.job_id not in serving]
        decisions.wait = [w for w in decisions.wait if w.job_id not in serving]
        admitted_now = {a.job_id for a in decisions.serving_admit} | {a.job_id for a in decisions.admit}
        waiting = {w.job_id for w in [*decisions.wait, *decisions.serving_wait]}
        holding = [*admitted, *preempting, *(v for v in queued if v.id in admitted_now)]
        self.snapshot = Snapshot(pools, unmanaged, decisions, [v for v in queued if v.id in waiting],
                                 _team_usage(holding, [v for v in queued if v.id in waiting], serving))
        return decisions

    def _deployment_view(self, d: DeploymentRecord, pools: Mapping[str, Pool]) -> JobView:
        """A deployment as the pass sees it: queued (QUEUED) or admitted, never preemptible, no slot.
        Its spec never changes once stored; its demand's key does when a cpu pool comes or goes
        (``serving_key``), and an admitted one is booked again then."""
        key = serving_key(pools)
        cached = self._demand.get(d.id)
        if cached is None or cached[0] != key:
            cached = self._demand[d.id] = (key, deployment_demand(ServeSpec.model_validate(d.spec), key))
        demand = cached[1]
        placement: dict[str, str] = {}
        if d.status is not DeploymentStatus.QUEUED:
            placement = self._placement.get(d.id) or {}
            if placement.keys() != demand.keys():
                placement = self._rebook(demand, pools)
            self._placement[d.id] = placement
        return JobView(d.id, d.team, SERVING_PRIORITY, d.created_at, demand, placement, slot=False)

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


def _team_usage(holding: Iterable[JobView], waiting: Iterable[JobView], serving: set[str]) -> dict[str, TeamUsage]:
    """Each team's holdings after a pass, jobs apart from deployments (``serving``: deployment ids)."""
    jobs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    served: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # team -> [holding, waiting] deployments
    for view in holding:
        into = served if view.id in serving else jobs
        counts[view.team][0] += view.id in serving
        for need in view.demand.values():
            for resource, amount in need.items():
                into[view.team][resource] += amount
    for view in waiting:
        counts[view.team][1] += view.id in serving
    teams = jobs.keys() | served.keys() | {t for t, (h, w) in counts.items() if h or w}
    return {t: TeamUsage({k: v for k, v in jobs[t].items() if v}, {k: v for k, v in served[t].items() if v},
                         *counts[t]) for t in sorted(teams)}
