"""One scheduling pass: admitted jobs keep their bookings, queued jobs are taken in the policy's
order and either admitted, kept waiting with a reason and a position, or given room by preemption.

Rules, in order, for each queued job:
1. it can never run (larger than its pools at the autoscaler's maximum): waits, saying so, and
   holds nothing up;
2. a pool it needs is held for a job ahead of it that is waiting for resources: it waits behind it
   (no back-filling past the head of a pool, so a large job is not starved by a stream of small ones);
3. the active-job limit is reached: it waits for a slot;
4. a placement exists in what is free: admitted unless that breaks its team's quota (then it waits,
   and holds nothing up: the quota is the team's own limit);
5. otherwise, room being made by jobs already preempting is claimed, or the preemption policy picks
   lower-priority victims; either way it waits, and its pools are held for it.

A serving deployment is one more view here (``orchestrator/scheduler/service.py`` makes them): its
replicas queue, hold and count against quotas like a job's workers, but take no active-job slot
and are never preempted (a replica has no checkpoint to resume from).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jobs.contracts.demand import Demand, devices
from jobs.contracts.pools import satisfies
from orchestrator.scheduler.policies import (
    BestFit,
    LowerPriorityFirst,
    Placement,
    Preemption,
    PriorityFairOrder,
    QueueOrder,
)
from orchestrator.scheduler.pools import Ledger, Pool, candidates, describe, missing, never_fits
from orchestrator.scheduler.views import JobView

# team -> pool or device -> devices (GPUs/NPUs for accelerator pools, CPUs for cpu pools)
Quotas = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class Policies:
    placement: Placement = BestFit()
    order: QueueOrder = PriorityFairOrder()
    preemption: Preemption = LowerPriorityFirst()


@dataclass(frozen=True)
class Admit:
    job_id: str
    placement: dict[str, str]


@dataclass(frozen=True)
class Wait:
    job_id: str
    position: int  # 1: first in line
    reason: str
    # It waits for room in its pools (not for quota, a slot, or a cluster it can never fit): what an
    # autoscaler could add (orchestrator/controller/demand_groups.py shows it these jobs' demand).
    needs_room: bool = False


@dataclass(frozen=True)
class Preempt:
    job_id: str  # the victim
    for_job: str
    reason: str


@dataclass
class Decisions:
    admit: list[Admit] = field(default_factory=list)
    wait: list[Wait] = field(default_factory=list)
    preempt: list[Preempt] = field(default_factory=list)
    reserved: dict[str, dict[str, float]] = field(default_factory=dict)  # pool -> held by admitted jobs
    queued_demand: dict[str, dict[str, float]] = field(default_factory=dict)  # pool or device -> waiting jobs'
    # Deployments' decisions, which Scheduler.plan moves out of ``admit`` and ``wait`` (those are the
    # jobs whose attempts the controller starts); the store records them (``store.deployments.record_queue``).
    serving_admit: list[Admit] = field(default_factory=list)
    serving_wait: list[Wait] = field(default_factory=list)


def team_usage(jobs: Sequence[JobView]) -> dict[str, dict[str, float]]:
    """Devices each team holds per pool, from admitted jobs' bookings."""
    usage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for job in jobs:
        for key, pool in job.placement.items():
            usage[job.team][pool] += devices(pool, job.demand[key])
    return usage


def quota_breach(job: JobView, placement: Mapping[str, str], usage: Mapping[str, Mapping[str, float]],
                 quotas: Quotas) -> str | None:
    """Which of the team's quotas ``job`` placed so would exceed (None: within all of them)."""
    for scope, limit in quotas.get(job.team, {}).items():
        held = sum(v for pool, v in usage.get(job.team, {}).items() if satisfies(pool, scope))
        adding = sum(devices(pool, job.demand[key]) for key, pool in placement.items() if satisfies(pool, scope))
        if adding and held + adding > limit:
            return (f"team {job.team} quota for {scope} is {limit:g} devices; it holds {held:g} "
                    f"and this one needs {adding:g}")
    return None


def schedule_pass(pools: Mapping[str, Pool], queued: Sequence[JobView], admitted: Sequence[JobView],
                  preempting: Sequence[JobView] = (), *, quotas: Quotas | None = None, max_active: int = 10**9,
                  policies: Policies = Policies()) -> Decisions:
    """Decide for every queued job. ``admitted``: jobs holding resources (with their placement),
    ``preempting``: those of them already told to stop (their room goes to the job they stop for)."""
    quotas = quotas or {}
    ledger = Ledger(pools)
    for job in [*admitted, *preempting]:
        ledger.take(job.placement, job.demand)
    incoming: dict[str, dict[str, float]] = {p: {} for p in pools}  # room preempting jobs will leave, unclaimed
    for job in preempting:
        _add(incoming, job.placement, job.demand)
    usage = team_usage([*admitted, *preempting])
    slots = max_active - sum(j.slot for j in [*admitted, *preempting])
    running = [j for j in admitted if j.preemptible]
    out = Decisions()
    blocked: dict[str, str] = {}  # pool -> the waiting job it is held for
    waiting: list[tuple[str, tuple[str, bool], Demand]] = []  # (job id, (reason, needs room), demand) in order

    for job in policies.order.order(queued, usage):
        reason = _admit_or_reason(job, pools, ledger, incoming, usage, quotas, slots, running, blocked,
                                  policies, out)
        if reason is None:
            slots -= job.slot
        else:
            waiting.append((job.id, reason, job.demand))

    for position, (job_id, (reason, room), demand) in enumerate(waiting, start=1):
        ahead = position - 1
        out.wait.append(Wait(job_id, position, f"{reason}; {ahead} job{'' if ahead == 1 else 's'} ahead", room))
        for key, need in demand.items():
            total = out.queued_demand.setdefault(key, {})
            for k, v in need.items():
                total[k] = total.get(k, 0.0) + v
    out.reserved = {p: {k: v for k, v in r.items() if v} for p, r in ledger.reserved.items()}
    return out


def _admit_or_reason(job: JobView, pools: Mapping[str, Pool], ledger: Ledger, incoming: dict[str, dict[str, float]],
                     usage: dict[str, dict[str, float]], quotas: Quotas, slots: int, running: list[JobView],
                     blocked: dict[str, str], policies: Policies, out: Decisions) -> tuple[str, bool] | None:
    """Admit ``job`` (recording it in ``out`` and the ledger) and return None, or say why it waits
    and whether it waits for room (``Wait.needs_room``)."""
    impossible = never_fits(job.demand, pools)
    if impossible:
        return f"can never run on this cluster: {impossible}", False
    wanted = {p for key in job.demand for p in candidates(pools, key)}
    if held_for := sorted({blocked[p] for p in wanted if p in blocked}):
        return f"waiting behind job {held_for[0]}, ahead in the queue for the same pool", True
    if job.slot and slots <= 0:
        return "waiting for an active-job slot (ORCH_MAX_ACTIVE_JOBS)", False
    placement = policies.placement.place(job.demand, ledger.free)
    if placement is not None:
        breach = quota_breach(job, placement, usage, quotas)
        if breach:
            return f"waiting for quota: {breach}", False
        ledger.take(placement, job.demand)
        for key, pool in placement.items():
            usage.setdefault(job.team, defaultdict(float))[pool] += devices(pool, job.demand[key])
        out.admit.append(Admit(job.id, placement))
        return None
    for p in wanted:
        blocked[p] = job.id
    reason = _shortfall(job.demand, ledger.free)
    with_incoming = {p: dict(r) for p, r in ledger.free.items()}
    for p, room in incoming.items():
        for k, v in room.items():
            with_incoming[p][k] = with_incoming[p].get(k, 0.0) + v
    if policies.placement.place(job.demand, with_incoming) is not None:
        for p in incoming:  # promised to this job: no later job counts on it
            incoming[p] = {}
        return f"{reason}; preempted jobs are making room", False  # room is coming: no new node needed

    def fits(victims: Sequence[JobView]) -> bool:
        room = {p: dict(r) for p, r in with_incoming.items()}
        for v in victims:
            _add(room, v.placement, v.demand)
        return policies.placement.place(job.demand, room) is not None

    victims = policies.preemption.victims(job, running, fits)
    if not victims:
        return reason, True
    for victim in victims:  # their bookings stay taken until they stop: promised to this job
        running.remove(victim)
        out.preempt.append(Preempt(victim.id, job.id, f"preempted by job {job.id} (priority {job.priority} over "
                                                      f"{victim.priority})"))
    return (f"{reason}; preempting {len(victims)} lower-priority job{'s' if len(victims) > 1 else ''} "
            f"({', '.join(v.id for v in victims)})", False)


def _add(room: dict[str, dict[str, float]], placement: Mapping[str, str], demand: Demand) -> None:
    for key, pool in placement.items():
        if pool in room:
            for k, v in demand[key].items():
                room[pool][k] = room[pool].get(k, 0.0) + v


def _shortfall(demand: Demand, free: Mapping[str, Mapping[str, float]]) -> str:
    """``waiting for 2 GPU in pool gpu-a100``: what the closest pool lacks for the first key that fits nowhere."""
    for key, need in demand.items():
        options = candidates(free, key)
        if not options:
            continue
        best = min(options, key=lambda p: (sum(missing(free[p], need).values()), p))
        lack = missing(free[best], need)
        if lack:
            return f"waiting for {describe(lack)} in pool {best}"
    return "waiting for resources"
