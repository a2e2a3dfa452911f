"""The train kind: distributed MoE training on Ray Train (jobs/train.py)."""

from __future__ import annotations

from jobs.kinds.base import Bundle, JobKind
from jobs.pools import DEVICE_RESOURCE, pool_device
from jobs.specs import TrainSpec
from jobs.trainer import DATA_TASK_CPUS


def train_bundles(spec: TrainSpec, times: int = 1) -> tuple[Bundle, ...]:
    """One bundle per worker at the job's largest size (its CPUs and its device), then Ray Data's CPUs
    (``DATA_TASK_CPUS``: without them the workers take every CPU and the input never comes, see
    ``jobs.trainer.check_room``); ``times`` such jobs at once (a sweep's concurrent trials). The pool
    with the most workers comes first: the driver and the data tasks are counted there, Ray places
    them anywhere and that pool is the one sure to be up while the job runs."""
    groups = spec.resources.worker_pools()
    main = max(groups, key=lambda p: groups[p])
    bundles = []
    for pool in sorted(groups, key=lambda p: p != main):
        need = {"CPU": spec.resources.cpus_per_worker}
        if (device := DEVICE_RESOURCE[pool_device(pool)]) is not None:
            need[device] = 1.0
        bundles.append(Bundle(pool, need, groups[pool] * times))
    return (*bundles, Bundle(main, {"CPU": DATA_TASK_CPUS}, times))


KIND = JobKind(
    "train", "jobs.train", TrainSpec, "distributed MoE training on Ray Train",
    path_fields=("data.source", "data.path", "checkpoint_storage"),
    demand=train_bundles,
    resizable=True,
    checkpoint_on_stop=True,
    servable_output=True,
)
