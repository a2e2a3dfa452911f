"""/v1/cluster: the Ray cluster's nodes and resources, totalled by node kind."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from orchestrator.api.deps import RayDep, SettingsDep
from orchestrator.api.schemas import ClusterPublic, KindPublic, NodePublic, Problem
from orchestrator.ray_client import NodeView, RayUnavailable

router = APIRouter(prefix="/v1/cluster", tags=["cluster"])


def _kind(resources: dict[str, float]) -> str:
    if resources.get("GPU", 0) > 0:
        return "gpu"
    if resources.get("NPU", 0) > 0:
        return "npu"
    return "cpu"


def _schedulable(resources: dict[str, float]) -> dict[str, float]:
    # node:<ip> and accelerator_type:<x> are Ray's per-node markers, not capacity.
    return {k: v for k, v in resources.items() if not k.startswith(("node:", "accelerator_type:"))}


def summarize(nodes: list[NodeView], address: str | None) -> ClusterPublic:
    alive = [n for n in nodes if n.state == "ALIVE"]
    totals: dict[str, float] = defaultdict(float)
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for n in alive:
        kind = _kind(n.resources)
        counts[kind] += 1
        for name, amount in _schedulable(n.resources).items():
            totals[name] += amount
            by_kind[kind][name] += amount
    return ClusterPublic(
        ray_address=address, alive_nodes=len(alive), totals=dict(totals),
        by_kind={k: KindPublic(nodes=counts[k], resources=dict(v)) for k, v in by_kind.items()},
        nodes=[NodePublic(node_id=n.node_id, ip=n.ip, is_head=n.is_head, state=n.state, kind=_kind(n.resources),
                          resources=_schedulable(n.resources)) for n in nodes],
    )


@router.get("", response_model=ClusterPublic,
            responses={503: {"model": Problem, "description": "Ray is not reachable"}})
async def cluster(ray: RayDep, settings: SettingsDep) -> ClusterPublic:
    """Nodes (alive and dead) and schedulable resources of alive nodes, in total and by node kind."""
    try:
        nodes = await run_in_threadpool(ray.nodes)
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    return summarize(nodes, settings.ray_address)
