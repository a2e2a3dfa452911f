"""The train kind: distributed MoE training on Ray Train (jobs/train.py)."""

from __future__ import annotations

from jobs.contracts.pools import DEVICE_RESOURCE, pool_device
from jobs.kinds.base import Bundle, JobKind
from jobs.specs.train import TrainSpec

# Logical CPUs Ray Data's read/pack tasks need beside the training workers (one task at a time suffices).
DATA_TASK_CPUS = 1.0
# Logical CPUs a local cluster made for training offers beyond what its workers take (the embedded one
# of jobs/runtime/trainer.py, `orch up`'s head): Ray's CPUs are scheduling tokens, and Ray Data's tasks
# need their own.
DATA_HEADROOM_CPUS = 2


def train_bundles(spec: TrainSpec, times: int = 1) -> tuple[Bundle, ...]:
    """One bundle per worker at the job's largest size (its CPUs and its device), then Ray Data's CPUs
    (``DATA_TASK_CPUS``: without them the workers take every CPU and the input never comes, see
    ``jobs.runtime.trainer.check_room``); ``times`` such jobs at once (a sweep's concurrent trials). The pool
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
