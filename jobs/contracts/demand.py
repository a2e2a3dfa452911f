"""What a job asks of the cluster, per pool: the scheduler's input (torch- and ray-free).

A job holds, for as long as it runs, what its kind's ``demand`` says (jobs/kinds/: a training job's
workers at their largest count, since Ray Train's elastic policy asks for the maximum, and Ray Data's
CPUs; a serve job's replicas at their maximum; a prepare job's one shard task at least), plus the
driver's own reservation (``ORCH_DRIVER_RESOURCES``, Ray Jobs' ``entrypoint_resources``), counted in
the pool of the kind's first bundle. Admission counts all of it, so an admitted job never waits
inside Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel

from jobs.contracts.pools import DEVICE_RESOURCE, pool_device
from jobs.kinds import Bundle, kind_of

# {pool or bare device: {Ray resource: amount}}, e.g. {"gpu-a100": {"GPU": 4.0, "CPU": 9.0}}
Demand = dict[str, dict[str, float]]


def job_demand(spec: BaseModel, driver_resources: Mapping[str, float] | None = None) -> Demand:
    """Everything a job of ``spec`` holds while it runs, per pool (see the module docstring)."""
    bundles = kind_of(spec).demand(spec)
    demand = totals(bundles)
    main = demand[bundles[0].pool]
    for resource, amount in (driver_resources or {}).items():
        if amount > 0:
            main[resource] = main.get(resource, 0.0) + amount
    return demand


def totals(bundles: Iterable[Bundle]) -> Demand:
    """The bundles summed per pool."""
    demand: Demand = {}
    for bundle in bundles:
        need = demand.setdefault(bundle.pool, {})
        for resource, amount in bundle.need.items():
            need[resource] = need.get(resource, 0.0) + amount * bundle.count
    return demand


def devices(pool: str, need: Mapping[str, float]) -> float:
    """The devices a demand takes in ``pool``: GPUs or NPUs in an accelerator pool, CPUs in a cpu pool.
    The unit of team quotas and of the fair order."""
    resource = DEVICE_RESOURCE[pool_device(pool)] or "CPU"
    return need.get(resource, 0.0)
