"""API schemas of /v1/cluster (routes/cluster.py): nodes, devices and the scheduler's pools."""

from __future__ import annotations

from jobs.specs.train import Device
from orchestrator.api.schemas.base import Schema


class NodePublic(Schema):
    node_id: str
    ip: str
    is_head: bool
    state: str
    device: Device  # the node's pool, in the specs' device vocabulary
    resources: dict[str, float]


class DevicePublic(Schema):
    nodes: int
    resources: dict[str, float]


class PoolPublic(Schema):
    """One pool (orchestrator/scheduler/pools.py): what its alive nodes have, who holds what, what waits."""

    device: Device
    nodes: int
    capacity: dict[str, float]
    max_capacity: dict[str, float]  # with what the autoscaler may add (ORCH_AUTOSCALER_MAX_EXTRA)
    reserved: dict[str, float]  # held by jobs the scheduler admitted (its own bookkeeping)
    unmanaged: dict[str, float]  # held by Ray jobs the service did not submit (`ray job submit`)
    in_use: dict[str, float]  # reserved + unmanaged
    free: dict[str, float]  # capacity - in_use: what the pool can give now
    queued_demand: dict[str, float]  # what QUEUED jobs waiting for this pool ask for
    queued_jobs: int


class ClusterPublic(Schema):
    ray_address: str | None
    alive_nodes: int
    totals: dict[str, float]
    by_device: dict[str, DevicePublic]
    nodes: list[NodePublic]
    pools: dict[str, PoolPublic] = {}
    unmanaged_jobs: int = 0  # Ray jobs running beside the service's
