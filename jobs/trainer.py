"""The trainer builder: one TorchTrainer from a validated spec, for ``jobs.train`` and for whoever
else runs training (sweeps, the scheduler), and the driver's connection to Ray.

``build_trainer`` checks that the cluster can ever run the job, then assembles Ray Train's objects;
running it (``fit()``), showing progress and writing the summary belong to the caller.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from jobs.specs import TrainSpec

RUN_NAME = "ray-train"  # Ray Train's run folder inside the output folder; fixed so a rerun finds the checkpoints
# Python processes the embedded cluster's raylet starts at once (and a quarter of the count it warns at).
STARTUP_CONCURRENCY = 8
# Logical CPUs Ray Data's read/pack tasks need beside the training workers (one task at a time suffices).
DATA_TASK_CPUS = 1.0
# Logical CPUs a local cluster made for training offers beyond what its workers take (the embedded one
# here, `orch up`'s head): Ray's CPUs are scheduling tokens, and Ray Data's tasks need their own.
DATA_HEADROOM_CPUS = 2


class ClusterTooSmall(RuntimeError):
    """The cluster can never hold the training workers and Ray Data's tasks together."""


def check_room(spec: TrainSpec) -> None:
    """Raise ClusterTooSmall when the cluster, at its largest, has fewer logical CPUs than the workers
    and one Ray Data task need. Ray Train would start the workers on every CPU and Ray Data's read
    tasks would then wait forever ("Cluster resources are not enough to run any task"), the job
    RUNNING without a step. An autoscaling cluster is judged by the largest size its config allows
    (Ray Train's own worker check reads the same private state); a fixed one by what it has now."""
    import ray
    from ray._private.state import state

    res = spec.resources
    largest = state.get_max_resources_from_cluster_config() or ray.cluster_resources()
    have, workers = largest.get("CPU", 0.0), res.num_workers * res.cpus_per_worker
    if have < workers + DATA_TASK_CPUS:
        raise ClusterTooSmall(
            f"the cluster has {have:g} CPUs; {res.num_workers} workers x {res.cpus_per_worker:g} CPUs take "
            f"{workers:g} and Ray Data's read tasks need {DATA_TASK_CPUS:g} more beside them, so the job "
            "would wait forever. Lower resources.num_workers or resources.cpus_per_worker, or give the "
            "cluster more CPUs (orch up --num-cpus N)")


def init_ray(spec: TrainSpec, verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster or start an embedded one.

    Without ``verbose`` the workers' and Ray actors' stdout/stderr stay in the session's log files
    (log_to_driver) and the driver's "ray" logger shows errors only (token set-up, "Started a local
    Ray instance"): progress comes over the display's queue and failures in fit()'s exception.
    """
    import ray
    from ray.data import DataContext

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        # Logical CPUs are scheduling tokens: leave room for Ray Data's read/pack tasks beside the
        # training workers, which otherwise take every core of a small machine and starve the input.
        cpus = max(os.cpu_count() or 1,
                   int(spec.resources.num_workers * spec.resources.cpus_per_worker) + DATA_HEADROOM_CPUS)
        # The dashboard (loopback only) serves Ray's state API, which Ray Train's controller polls.
        # worker_maximum_startup_concurrency: the raylet warns the driver each time the Python
        # processes it started reach 4x this (default: the cores, 2 on a small machine), which a
        # run's ~14 (workers, Train controller, Ray Data actors and tasks) does; it also caps how
        # many of them start at once.
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       _system_config={"worker_maximum_startup_concurrency": STARTUP_CONCURRENCY}, **quiet)
        print(f"ray: embedded local cluster; dashboard at http://{ctx.dashboard_url}", flush=True)
    DataContext.get_current().enable_progress_bars = False


def build_trainer(spec: TrainSpec, manifest: dict[str, Any], out: Path, *, progress: Any = None,
                  run_name: str = RUN_NAME, verbose: bool = False) -> Any:
    """A TorchTrainer for ``spec`` on the shards of ``manifest``, checkpointing under ``out/run_name``
    (and resuming from the latest checkpoint there). ``progress``: a ray.util.queue.Queue that rank 0
    sends its progress records to (jobs/display.py), or None. "Checkpoint now" requests are read from
    ``out`` (workers/control.py)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.contracts import WorkerConfig
    from workers.data import make_datasets
    from workers.device import backend_for, worker_resources
    from workers.loop import train_loop_per_worker

    check_room(spec)
    datasets = make_datasets(manifest, spec.data.seq_len, spec.seed)
    res = spec.resources
    worker = WorkerConfig(model=spec.model, compression=spec.compression, loop=spec.train, seed=spec.seed,
                          device=res.device, expert_parallel=res.expert_parallel, has_val="val" in datasets,
                          control_dir=str(out))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker.model_dump(mode="json"), "progress": progress},
        torch_config=TorchConfig(backend=backend_for(res.device)),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.device == "gpu",
                                     resources_per_worker=worker_resources(res.device, res.cpus_per_worker)),
        run_config=RunConfig(name=run_name, storage_path=str(out),
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
        datasets=datasets,
    )
