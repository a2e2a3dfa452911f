"""The trainer builder: one TorchTrainer from a validated spec, for ``jobs.train`` and for whoever
else runs training (sweeps, the scheduler), the driver's connection to Ray, and what a finished run's
checkpoint gives (``checkpoint_uri``, ``sample_checkpoint``).

``build_trainer`` checks that the cluster can ever run the job, then assembles Ray Train's objects;
running it (``fit()``), showing progress and writing the summary belong to the caller.

Placement (``placement``): a job whose workers share one device reserves it in each worker's bundle, so Ray
gives each worker its own device and sets CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES. A job
spanning pools gets one label selector per worker (Ray Train v2 takes a list, one per worker), each
naming the nodes of that worker's pool (``ray.io/node-id in (...)``, resolved here from the live
nodes by jobs/contracts/pools.py, so bare devices and unlabelled nodes work too). Ray Train gives every
worker one bundle shape, so a job that mixes devices reserves CPUs only in its bundles; a worker reserving no
device would see every device of its node (Ray leaves the variables unset) and two jobs could take
the same one, so each accelerator worker of such a job leases one device of its node through Ray
(workers/device.py, ``lease_device``) and sees only that one. Mixed devices sync through gloo.

Size and failures: an elastic job (``resources.num_workers: [min, max]``) gets Ray Train v2's elastic
policy, which restarts the worker group at a new size from the latest checkpoint when nodes come or
go; lost workers are retried ``max_failures`` times, announced preemptions ``max_preemption_failures``
times, and the workers checkpoint on a preemption notice (workers/loop.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.data import DataContext
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.contracts.pools import pool_device, pool_of, satisfies
from jobs.contracts.ray_private import max_cluster_resources
from jobs.kinds.train import DATA_HEADROOM_CPUS, DATA_TASK_CPUS
from jobs.specs.train import ResourcesSpec, TrainSpec
from workers import confine
from workers.checkpoint import load_model, load_tokenizer_for
from workers.contracts import WorkerConfig
from workers.data import TrainingData, s3_env
from workers.data.storage import is_s3, open_fs, uri_of
from workers.device import backend_for, worker_resources
from workers.loop import train_loop_per_worker
from workers.sampling import sample_text

# Ray's own node label: every node carries its id under it (label selectors can name nodes).
NODE_ID_LABEL = "ray.io/node-id"
RUN_NAME = "ray-train"  # Ray Train's run folder inside the output folder; fixed so a rerun finds the checkpoints
# Python processes the embedded cluster's raylet starts at once (and a quarter of the count it warns at).
STARTUP_CONCURRENCY = 8
# Ray Train's record of a run's checkpoints, in the run folder: it names each by a path relative to
# that folder, restores the latest from it and deletes the ones past keep_checkpoints by that name.
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Every Ray Data execution in a Train worker registers a resource request with Ray Data's cluster-wide
# AutoscalingCoordinator, which splits the CPUs left beside the workers equally (whole CPUs) among
# the live requests. A killed worker never cancels its request, and Ray keeps one 180 s after its
# last renewal: after a restart the dead group's requests shared the spare CPUs with the new
# group's (2 // 4 = 0 CPUs each), the new pipelines ran a task only when the loop starved, and their
# scheduling loops spun in the worker processes, a third of the throughput for three minutes.
# A live execution renews its request every DATA_REQUEST_RENEW_S, so a request of a dead one lapses
# within DATA_REQUEST_EXPIRE_S (Ray Data's own settings, read where each execution starts).
DATA_REQUEST_RENEW_S = 3
DATA_REQUEST_EXPIRE_S = 10
DATA_REQUEST_ENV = {"RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": str(DATA_REQUEST_RENEW_S),
                    "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": str(DATA_REQUEST_EXPIRE_S)}
# How often Ray Train's controller polls its workers (Ray's default 2 s): it notices a dead worker and
# registers a reported checkpoint (which rank 0 waits for, workers/loop.py) at its next poll.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# No module is preloaded into the embedded cluster's workers (Ray's preload_python_modules): Ray never
# places an actor on the idle workers it started ahead (each Train and Tune actor gets a process of its
# own, and Train gives its controller and workers runtime-env variables besides), so a preloaded torch
# only made every new actor import it before its first call: the ~9 actors of a sweep trial's Train
# run and the ~6 of a restart, of which only the controller and the workers use torch (a bare actor
# alive in 0.7-1.1 s without, 1.5-2.6 s with; tests/bench/sweeps.py measures the trials).


class ClusterTooSmall(RuntimeError):
    """The cluster can never hold the training workers and Ray Data's tasks together."""


def check_room(spec: TrainSpec) -> None:
    """Raise ClusterTooSmall when the cluster, at its largest, has fewer logical CPUs than the workers
    and one Ray Data task need. Ray Train would start the workers on every CPU and Ray Data's read
    tasks would then wait forever ("Cluster resources are not enough to run any task"), the job
    RUNNING without a step. An autoscaling cluster is judged by the largest size its config allows
    (Ray Train's own worker check reads the same private state); a fixed one by what it has now."""
    res = spec.resources
    largest = max_cluster_resources() or ray.cluster_resources()
    # An elastic job runs once its min fits (Ray Train waits for no more).
    have, workers = largest.get("CPU", 0.0), res.min_workers * res.cpus_per_worker
    if have < workers + DATA_TASK_CPUS:
        raise ClusterTooSmall(
            f"the cluster has {have:g} CPUs; {res.min_workers} workers x {res.cpus_per_worker:g} CPUs take "
            f"{workers:g} and Ray Data's read tasks need {DATA_TASK_CPUS:g} more beside them, so the job "
            "would wait forever. Lower resources.num_workers or resources.cpus_per_worker, or give the "
            "cluster more CPUs (orch up --num-cpus N)")


def check_storage(storage: str | None, out: Path, run_name: str = RUN_NAME) -> None:
    """Refuse, before Ray Train writes anything, a run whose checkpoints would be written, pruned or
    resumed outside the team's data roots (``ORCH_DATA_ROOTS``, workers/confine.py; the job's own
    ``out`` folder is always allowed): raises OutsideRoots naming the entry when the storage folder
    (``storage``, else ``out``) or its run folder resolves outside them, when any entry inside the run
    folder is a link leading outside them, or when Train's snapshot names a checkpoint outside the
    run folder (``../``, an absolute path). The roots were checked at submission on the top folder
    only; Train would follow such a link or name when it saves, prunes (deletes) and resumes.
    Unconfined jobs and ``s3://`` storage (keys have no links): nothing to check."""
    roots = confine.from_env()
    if roots is None or (storage and is_s3(storage)):
        return
    roots = roots.with_roots(out)
    base = Path(open_fs(storage)[1] if storage else out)
    roots.check(base, "checkpoint_storage" if storage else "output folder")
    run = roots.check(base / run_name, "checkpoint folder")
    for folder, dirs, files in os.walk(run):  # links are listed, never entered (followlinks=False)
        for name in dirs + files:
            if (entry := Path(folder, name)).is_symlink():
                roots.check(entry, "link")
    snapshot = run / TRAIN_SNAPSHOT_FILE
    if snapshot.is_file():
        with roots.open(snapshot) as f:
            names = _checkpoint_names(json.load(f))
        for name in names:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise confine.OutsideRoots(f"{snapshot} names checkpoint {name!r} outside its run folder; "
                                           "Ray Train would resume from it and delete it")


def _checkpoint_names(obj: Any) -> list[str]:
    """Every checkpoint folder name in Ray Train's snapshot (``checkpoint_dir_name`` fields and
    ``..._checkpoint_dir_names`` lists, at any depth)."""
    if isinstance(obj, list):
        return [n for item in obj for n in _checkpoint_names(item)]
    if not isinstance(obj, dict):
        return []
    names = []
    for key, value in obj.items():
        if key.endswith("checkpoint_dir_name") and isinstance(value, str):
            names.append(value)
        elif key.endswith("checkpoint_dir_names") and isinstance(value, list):
            names += [v for v in value if isinstance(v, str)]
        else:
            names += _checkpoint_names(value)
    return names


@dataclass
class Placement:
    """Where a job's workers go and what each reserves (module docstring)."""

    scaling_config: Any  # ray.train.ScalingConfig
    backend: str  # the collective backend: the device's own, or gloo when the job mixes devices
    node_devices: dict[str, str]  # node id -> worker device, for a job spanning pools (WorkerConfig.node_devices)
    lease_devices: bool  # accelerator workers lease their device (the bundles hold CPUs only)


def _pool_selectors(res: ResourcesSpec) -> tuple[list[dict[str, str]], dict[str, str]]:
    """One label selector per worker naming the live nodes of its pool, and node id -> device."""
    nodes = {n["NodeID"]: pool_of(n["Resources"], n.get("Labels") or {}) for n in ray.nodes() if n["Alive"]}
    selectors, node_devices = [], {}
    for wanted, count in res.worker_pools().items():
        ids = sorted(node for node, pool in nodes.items() if satisfies(pool, wanted))
        if not ids:
            raise ClusterTooSmall(f"resources.pools: no node of pool {wanted!r} in the cluster "
                                  f"(its pools: {', '.join(sorted(set(nodes.values())))})")
        node_devices.update({node: pool_device(nodes[node]) for node in ids})
        selectors += [{NODE_ID_LABEL: ids[0] if len(ids) == 1 else f"in({','.join(ids)})"}] * count
    return selectors, node_devices


def placement(spec: TrainSpec) -> Placement:
    """The Ray Train scaling config and backend of ``spec``'s workers (module docstring)."""
    res = spec.resources
    if res.pools is None:  # the only form an elastic size takes (a job spanning pools has fixed counts)
        return Placement(ScalingConfig(num_workers=res.num_workers, use_gpu=res.device == "gpu",
                                       resources_per_worker=worker_resources(res.device, res.cpus_per_worker),
                                       elastic_resize_monitor_interval_s=res.elastic_resize_monitor_interval_s),
                         backend_for(res.device), {}, lease_devices=False)
    selectors, node_devices = _pool_selectors(res)
    device = "cpu" if res.mixed_devices else res.device  # the bundle's device, when every worker has one
    scaling = ScalingConfig(num_workers=res.num_workers, use_gpu=device == "gpu", label_selector=selectors,
                            resources_per_worker=worker_resources(device, res.cpus_per_worker))
    return Placement(scaling, "gloo" if res.mixed_devices else backend_for(res.device), node_devices,
                     lease_devices=res.mixed_devices)


def init_ray(spec: TrainSpec, verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster or start an embedded one.

    Without ``verbose`` the workers' and Ray actors' stdout/stderr stay in the session's log files
    (log_to_driver) and the driver's "ray" logger shows errors only (token set-up, "Started a local
    Ray instance"): progress comes over the display's queue and failures in fit()'s exception.
    """
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        # Ray's settings above reach every process of the cluster from this one's environment (the
        # raylet and the workers it starts inherit it), unless the environment sets its own.
        os.environ.update({k: v for k, v in {**DATA_REQUEST_ENV, **TRAIN_POLL_ENV}.items() if k not in os.environ})
        # Logical CPUs are scheduling tokens: leave room for Ray Data's read/pack tasks beside the
        # training workers, which otherwise take every core of a small machine and starve the input.
        cpus = max(os.cpu_count() or 1,
                   int(spec.resources.max_workers * spec.resources.cpus_per_worker) + DATA_HEADROOM_CPUS)
        # The dashboard (loopback only) serves Ray's state API, which Ray Train's controller polls.
        # worker_maximum_startup_concurrency: the raylet warns the driver each time the Python
        # processes it started reach 4x this (default: the cores, 2 on a small machine), which a
        # run's ~14 (workers, Train controller, Ray Data actors and tasks) does; it also caps how
        # many of them start at once.
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       _system_config={"worker_maximum_startup_concurrency": STARTUP_CONCURRENCY}, **quiet)
        print(f"ray: embedded local cluster; dashboard at http://{ctx.dashboard_url}", flush=True)
    DataContext.get_current().enable_progress_bars = False


def loop_config(spec: TrainSpec, data: TrainingData, out: Path, *, progress: Any = None,
                place: Placement | None = None) -> dict[str, Any]:
    """The config of the per-worker loop (workers/loop.py) for ``spec`` on ``data``: "checkpoint now"
    requests are read from ``out``; ``place``: the Train run's placement (None: one process with the
    spec's device, as a one-worker sweep trial runs in its Tune actor)."""
    res = spec.resources
    worker = WorkerConfig(model=spec.model, compression=spec.compression, loop=spec.train, seed=spec.seed,
                          device=res.device, expert_parallel=res.expert_parallel,
                          node_devices=place.node_devices if place else {},
                          lease_devices=place.lease_devices if place else False, control_dir=str(out),
                          # Preemption notices come from Ray Train, which one process does not run under.
                          preemption_check_every=res.preemption_check_every if place else 0)
    return {"worker": worker.model_dump(mode="json"), "progress": progress, "tokenizer": data.tokenizer.to_json(),
            "data": data.plan("train", spec.data), "val": data.plan("val", spec.data)}


def build_trainer(spec: TrainSpec, data: TrainingData, out: Path, *, progress: Any = None,
                  run_name: str = RUN_NAME, verbose: bool = False, storage: str | None = None,
                  train_loop: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """A TorchTrainer for ``spec`` on ``data`` (workers.data.TrainingData), checkpointing under ``<storage or out>/run_name``
    (and resuming from the latest checkpoint there; refused with OutsideRoots when that folder leads
    outside the team's roots, ``check_storage``). ``storage``: a local folder or ``s3://`` prefix
    (jobs.train passes the spec's ``checkpoint_storage``), reached through workers/data/storage.py's
    filesystem so the AWS_* endpoint and keys reach Ray Train's controller and workers; raises
    StorageError naming the bucket when it does not answer. ``progress``: a ray.util.queue.Queue that rank 0
    sends its progress records to (jobs/runtime/display.py), or None. "Checkpoint now" requests are read from
    ``out``, which stays a local folder (workers/control.py). ``train_loop``: the per-worker function,
    workers.loop's by default (one that wraps it, e.g. to instrument the workers, takes the same config)."""
    storage_fs, storage_path = open_fs(storage) if storage else (None, str(out))
    check_storage(storage, out, run_name)
    check_room(spec)
    place = placement(spec)
    res = spec.resources
    # A cluster started by init_ray has DATA_REQUEST_ENV in every process; other workers get it here.
    data_env = {k: v for k, v in DATA_REQUEST_ENV.items() if os.environ.get(k) != v}
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config(spec, data, out, progress=progress, place=place),
        torch_config=TorchConfig(backend=place.backend),
        scaling_config=place.scaling_config,
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             worker_runtime_env={"env_vars": {**s3_env(), **data_env}},
                             failure_config=FailureConfig(max_failures=res.max_failures,
                                                          max_preemption_failures=res.max_preemption_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )


def checkpoint_uri(checkpoint: Any) -> str:
    """A reported checkpoint (ray.train.Checkpoint) as users and jobs.serve name it: its folder, or
    ``s3://bucket/...`` when the run's storage is on S3."""
    return uri_of(checkpoint.filesystem, checkpoint.path)


def sample_checkpoint(checkpoint: Any, spec: TrainSpec) -> list[str]:
    """The summary's samples from a reported checkpoint (copied to a temporary folder first when it
    lies on S3), decoded with the tokenizer it stores."""
    with checkpoint.as_directory() as folder:
        path = Path(folder)
        # A local checkpoint is read under the job's roots; an S3 one from the copy Ray just made here.
        also = () if isinstance(checkpoint.filesystem, pafs.LocalFileSystem) else (folder,)
        return sample_text(load_model(path, spec.model, also=also), load_tokenizer_for(path, also=also),
                           seed=spec.seed)
