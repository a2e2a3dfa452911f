"""Pools derived from what Ray reports, and the free-resource ledger of one scheduling pass.

Nothing is configured by hand: each alive node's pool is ``jobs.contracts.pools.pool_of(resources, labels)``.
A pool's *capacity* is its alive nodes' totals; *unmanaged* is what Ray jobs the service did not
submit (``ray job submit``) hold there; *max capacity* adds what the autoscaler may still bring
(``ORCH_AUTOSCALER_MAX_EXTRA``, per pool), the bar for "can this job ever run".

A demand key (a pool or a bare device) is booked in ONE pool: Ray Train's worker group is one
placement group whose workers must be alike, so they stay within one pool.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jobs.contracts.demand import Demand
from jobs.contracts.pools import pool_device, pool_of, satisfies
from orchestrator.ray_client import NodeView, UnmanagedJob

Resources = dict[str, float]
# Ray's per-node markers, not capacity a job can reserve.
_MARKERS = ("node:", "accelerator_type:")
EPSILON = 1e-9  # Ray's fractional resources are float sums: compare with a tolerance


def schedulable(resources: Mapping[str, float]) -> Resources:
    return {k: float(v) for k, v in resources.items() if not k.startswith(_MARKERS)}


@dataclass(frozen=True)
class Pool:
    name: str
    nodes: int
    capacity: Resources
    unmanaged: Resources = field(default_factory=dict)
    max_capacity: Resources = field(default_factory=dict)

    @property
    def device(self) -> str:
        return pool_device(self.name)


def build_pools(nodes: Iterable[NodeView], unmanaged: Iterable[UnmanagedJob] = (),
                max_extra: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Pool]:
    """Pools of the alive ``nodes``; ``unmanaged`` jobs' holdings counted on the pools of their nodes;
    ``max_extra`` (pool -> resources the autoscaler may add) raises max capacity, and names pools
    that have no node yet."""
    capacity: dict[str, Resources] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    pool_of_node: dict[str, str] = {}
    for n in nodes:
        if n.state != "ALIVE":
            continue
        name = pool_of(n.resources, n.labels)
        pool_of_node[n.node_id] = name
        counts[name] += 1
        for k, v in schedulable(n.resources).items():
            capacity[name][k] += v
    held: dict[str, Resources] = defaultdict(lambda: defaultdict(float))
    for job in unmanaged:
        for node_id, resources in job.node_resources.items():
            if node_id in pool_of_node:
                for k, v in schedulable(resources).items():
                    held[pool_of_node[node_id]][k] += v
    extra = max_extra or {}
    pools = {}
    for name in sorted(capacity.keys() | extra.keys()):
        top = dict(capacity.get(name, {}))
        for k, v in extra.get(name, {}).items():
            top[k] = top.get(k, 0.0) + v
        pools[name] = Pool(name, counts.get(name, 0), dict(capacity.get(name, {})), dict(held.get(name, {})), top)
    return pools


def covers(have: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(have.get(k, 0.0) + EPSILON >= v for k, v in need.items())


def missing(have: Mapping[str, float], need: Mapping[str, float]) -> Resources:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + EPSILON < v}


def describe(resources: Mapping[str, float]) -> str:
    """``{"GPU": 2, "CPU": 3.5}`` -> ``2 GPU, 3.5 CPU`` (the words of queue reasons and refusals)."""
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items(), key=lambda kv: (kv[0] == "CPU", kv[0])))


def candidates(pools: Iterable[str], key: str) -> list[str]:
    """The pools that can hold a demand key (the pool itself, or every pool of a bare device)."""
    return [p for p in pools if satisfies(p, key)]


def never_fits(demand: Demand, pools: Mapping[str, Pool], what: str = "the job") -> str | None:
    """Why ``demand`` (of ``what``) cannot run even with every node the autoscaler may add (None: it can)."""
    problems = []
    for key, need in demand.items():
        options = candidates(pools, key)
        if any(covers(pools[p].max_capacity, need) for p in options):
            continue
        if not options:
            problems.append(f"no pool {key!r} (pools: {', '.join(pools) or 'none'})")
            continue
        best = min(options, key=lambda p: sum(missing(pools[p].max_capacity, need).values()))
        problems.append(f"pool {best} can hold at most {describe(pools[best].max_capacity) or 'nothing'}; "
                        f"{what} needs {describe(need)} there (short by {describe(missing(pools[best].max_capacity, need))})")
    return "; ".join(problems) or None


class Ledger:
    """Free resources per pool during one pass: capacity, less unmanaged jobs' holdings, less what
    admitted jobs hold by the scheduler's own bookkeeping (*reserved*: booked at admission, before
    Ray shows it in use)."""

    def __init__(self, pools: Mapping[str, Pool]):
        self.pools = pools
        self.free: dict[str, Resources] = {
            name: {k: v - p.unmanaged.get(k, 0.0) for k, v in p.capacity.items()} for name, p in pools.items()}
        self.reserved: dict[str, Resources] = {name: {} for name in pools}

    def take(self, placement: Mapping[str, str], demand: Demand) -> None:
        for key, pool in placement.items():
            if pool not in self.free:  # booked in a pool whose nodes are gone: nothing to take from
                continue
            for k, v in demand[key].items():
                self.free[pool][k] = self.free[pool].get(k, 0.0) - v
                self.reserved[pool][k] = self.reserved[pool].get(k, 0.0) + v
