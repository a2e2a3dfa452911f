"""/v1/cluster: the Ray cluster's nodes and resources, totalled by device, per pool what is held
(by the service's admitted jobs and deployments and by unmanaged Ray jobs), what is free and what
waits, and per team what its jobs and its deployments' replicas hold (an admin sees every team, a
user its own: one team's usage is not another's business)."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from orchestrator.api.deps import ControllerDep, PrincipalDep, RayDep, SettingsDep
from orchestrator.api.schemas.base import Problem
from orchestrator.api.schemas.cluster import ClusterPublic, DevicePublic, NodePublic, PoolPublic
from orchestrator.auth import Principal
from orchestrator.ray_client import NodeView, RayUnavailable, UnmanagedJob
from orchestrator.scheduler.pools import build_pools, candidates
from orchestrator.scheduler.service import Snapshot

router = APIRouter(prefix="/v1/cluster", tags=["cluster"])


class TeamUsagePublic(BaseModel):
    """What a team holds by the scheduler's bookings (Ray resource -> amount, over all pools)."""
    jobs: dict[str, float]  # its admitted jobs: workers, Ray Data CPUs, drivers
    serving: dict[str, float]  # its deployments' replicas, at their maximum count
    deployments: int  # deployments holding resources
    queued_deployments: int  # deployments waiting for quota or room


class ClusterUsagePublic(ClusterPublic):
    teams: dict[str, TeamUsagePublic] = {}  # from the controller's last pass; a user sees its own team


def team_report(snapshot: Snapshot | None, principal: Principal) -> dict[str, TeamUsagePublic]:
    teams = snapshot.teams if snapshot else {}
    return {name: TeamUsagePublic(**vars(usage)) for name, usage in teams.items()
            if principal.is_admin or name == principal.team}


def _device(resources: dict[str, float]) -> str:
    if resources.get("GPU", 0) > 0:
        return "gpu"
    if resources.get("NPU", 0) > 0:
        return "npu"
    return "cpu"


def _schedulable(resources: dict[str, float]) -> dict[str, float]:
    # node:<ip> and accelerator_type:<x> are Ray's per-node markers, not capacity.
    return {k: v for k, v in resources.items() if not k.startswith(("node:", "accelerator_type:"))}


def _add(into: dict[str, float], resources: dict[str, float]) -> None:
    for k, v in resources.items():
        into[k] = into.get(k, 0.0) + v


def pool_report(nodes: list[NodeView], unmanaged: list[UnmanagedJob], max_extra: dict[str, dict[str, float]],
                snapshot: Snapshot | None) -> dict[str, PoolPublic]:
    """Pools from the nodes now; reserved and queued figures from the controller's last pass. A queued
    demand for a bare device (``gpu``) is shown on that device's largest pool, where it most likely goes."""
    pools = build_pools(nodes, unmanaged, max_extra)
    reserved = snapshot.decisions.reserved if snapshot else {}
    queued: dict[str, dict[str, float]] = defaultdict(dict)
    waiting: dict[str, int] = defaultdict(int)
    for view in snapshot.queued if snapshot else ():
        main = max(view.demand, key=lambda k: len(view.demand[k]))  # the workers' key, with the device
        for key, need in view.demand.items():
            options = candidates(pools, key)
            if options:
                target = max(options, key=lambda p: (sum(pools[p].capacity.values()), p))
                _add(queued[target], need)
                waiting[target] += key == main
    out = {}
    for name, pool in pools.items():
        in_use = dict(reserved.get(name, {}))
        _add(in_use, pool.unmanaged)
        out[name] = PoolPublic(
            device=pool.device, nodes=pool.nodes, capacity=pool.capacity, max_capacity=pool.max_capacity,
            reserved=reserved.get(name, {}), unmanaged=pool.unmanaged, in_use=in_use,
            free={k: v - in_use.get(k, 0.0) for k, v in pool.capacity.items()},
            queued_demand=queued.get(name, {}), queued_jobs=waiting.get(name, 0))
    return out


def summarize(nodes: list[NodeView], address: str | None) -> ClusterPublic:
    alive = [n for n in nodes if n.state == "ALIVE"]
    totals: dict[str, float] = defaultdict(float)
    by_device: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for n in alive:
        device = _device(n.resources)
        counts[device] += 1
        for name, amount in _schedulable(n.resources).items():
            totals[name] += amount
            by_device[device][name] += amount
    return ClusterPublic(
        ray_address=address, alive_nodes=len(alive), totals=dict(totals),
        by_device={k: DevicePublic(nodes=counts[k], resources=dict(v)) for k, v in by_device.items()},
        nodes=[NodePublic(node_id=n.node_id, ip=n.ip, is_head=n.is_head, state=n.state, device=_device(n.resources),
                          resources=_schedulable(n.resources)) for n in nodes],
    )


@router.get("", response_model=ClusterUsagePublic,
            responses={503: {"model": Problem, "description": "Ray is not reachable"}})
async def cluster(ray: RayDep, settings: SettingsDep, controller: ControllerDep,
                  principal: PrincipalDep) -> ClusterUsagePublic:
    """Nodes (alive and dead) and schedulable resources of alive nodes, in total and by device;
    per pool: capacity, reserved, unmanaged, in use, free, queued demand; per team (yours, or every
    team's for an admin): what its jobs and its deployments' replicas hold."""
    try:
        nodes = await run_in_threadpool(ray.nodes)
        unmanaged = await run_in_threadpool(ray.unmanaged_jobs)
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    snapshot = controller.scheduler.snapshot if controller is not None else None
    summary = dict(summarize(nodes, settings.ray_address))
    summary.update(pools=pool_report(nodes, unmanaged, settings.autoscaler_max_extra, snapshot),
                   unmanaged_jobs=len(unmanaged), teams=team_report(snapshot, principal))
    return ClusterUsagePublic(**summary)
