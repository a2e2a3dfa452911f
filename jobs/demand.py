"""What a job asks of the cluster, per pool: the scheduler's input (torch- and ray-free).

A training job holds, for as long as it runs: its workers at their largest count (Ray Train's elastic policy
asks for the maximum), the driver's own reservation (``ORCH_DRIVER_RESOURCES``, Ray Jobs'
``entrypoint_resources``), and the CPUs Ray Data's read and pack tasks take beside the workers
(``DATA_TASK_CPUS``: without them the workers take every CPU and the input never comes, see
``jobs.trainer.check_room``). Admission counts all of it, so an admitted job never waits inside Ray.

The driver and the data tasks are counted in the pool of the job's largest worker group: Ray places
them anywhere, and that pool is the one sure to be up while the job runs. A serve job holds its
replicas at their maximum (as a deployment does, orchestrator/scheduler/service.py: Serve's autoscaler
adds replicas up to it without asking), a prepare job one shard task at least (it takes what is free
beyond that); both run on CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from jobs.pools import DEVICE_RESOURCE, pool_kind
from jobs.prepare_spec import PrepareSpec
from jobs.serve_spec import ServeSpec
from jobs.specs import TrainSpec
from jobs.sweep_spec import SweepSpec
from jobs.trainer import DATA_TASK_CPUS

# {pool or kind: {Ray resource: amount}}, e.g. {"gpu-a100": {"GPU": 4.0, "CPU": 9.0}}
Demand = dict[str, dict[str, float]]


def job_demand(spec: BaseModel, driver_resources: Mapping[str, float] | None = None) -> Demand:
    """Everything a job of ``spec`` holds while it runs, per pool (see the module docstring)."""
    if isinstance(spec, TrainSpec):
        groups = spec.resources.worker_pools()
        demand = _train_demand(spec)
        main = demand[max(groups, key=lambda p: groups[p])]
    elif isinstance(spec, SweepSpec):  # its trials at most at once, each a training job
        trial = spec.trial_spec({})
        groups = trial.resources.worker_pools()
        demand = {pool: {r: v * spec.max_concurrent for r, v in need.items()}
                  for pool, need in _train_demand(trial).items()}
        main = demand[max(groups, key=lambda p: groups[p])]
    elif isinstance(spec, ServeSpec):
        main = {"CPU": spec.autoscaling.max_replicas * spec.num_cpus}
        demand = {"cpu": main}
    elif isinstance(spec, PrepareSpec):
        main = {"CPU": (spec.max_tasks or 1) * spec.cpus_per_task}
        demand = {"cpu": main}
    else:
        raise TypeError(f"no demand model for {type(spec).__name__}")
    for resource, amount in (driver_resources or {}).items():
        if amount > 0:
            main[resource] = main.get(resource, 0.0) + amount
    return demand


def _train_demand(spec: TrainSpec) -> Demand:
    """Workers per pool at the job's largest size, and Ray Data's CPUs beside the largest group."""
    groups = spec.resources.worker_pools()
    demand: Demand = {}
    for pool, workers in groups.items():
        need = demand.setdefault(pool, {})
        need["CPU"] = need.get("CPU", 0.0) + workers * spec.resources.cpus_per_worker
        device = DEVICE_RESOURCE[pool_kind(pool)]
        if device is not None:
            need[device] = need.get(device, 0.0) + float(workers)
    demand[max(groups, key=lambda p: groups[p])]["CPU"] += DATA_TASK_CPUS
    return demand


def devices(pool: str, need: Mapping[str, float]) -> float:
    """The devices a demand takes in ``pool``: GPUs or NPUs in an accelerator pool, CPUs in a cpu pool.
    The unit of team quotas and of the fair order."""
    resource = DEVICE_RESOURCE[pool_kind(pool)] or "CPU"
    return need.get(resource, 0.0)
