"""Integration: jobs spanning pools on the shared multi-node cluster (tests/support/cluster.py).

- Two jobs, each with a worker in the GPU pool and one in a CPU pool, run at the same time on one
  node with two (logical) GPUs: each GPU worker leases a different device, and sees only it. The
  workers run a tiny function through the product's placement (workers/loop.py, ``place_worker``)
  instead of training, since nothing here can run CUDA.
- A job spanning the cpu-a and cpu-b pools trains with the speed-aware split (real TorchTrainer,
  real Ray Data, the tiny model): each worker lands in its pool (from Ray's state API) and the
  loss falls.
"""

from __future__ import annotations

import os
import threading

import pytest

from jobs.runtime.trainer import build_trainer, placement
from jobs.specs.train import load_spec, validate_spec
from tests.conftest import DEMO, TINY
from workers.contracts import WorkerConfig

pytestmark = pytest.mark.ray

# Seconds a worker of the placement test waits for the other job's workers (both jobs must hold
# their leases at once for distinct ids to mean anything).
BARRIER_TIMEOUT_S = 120
JOIN_TIMEOUT_S = 300


class _Barrier:
    """Counts arrivals; the workers poll it (a Ray actor, made in the test)."""

    def __init__(self) -> None:
        self.arrived = 0

    def arrive(self) -> int:
        self.arrived += 1
        return self.arrived

    def count(self) -> int:
        return self.arrived


def _report_placement(config: dict) -> None:
    """A worker of the placement test: place itself as the training loop does, report what it saw,
    and hold its lease until every worker of both jobs has reported."""
    import ray
    import ray.train

    from workers.device import DeviceUnavailable, torch_device
    from workers.loop import place_worker
    from workers.waiting import wait_until

    cfg = WorkerConfig.model_validate(config["worker"])
    placed = place_worker(cfg)
    try:
        torch_device(placed.device)
        device_error = None
    except DeviceUnavailable as e:
        device_error = str(e)
    config["queue"].put({
        "job": config["job"], "rank": ray.train.get_context().get_world_rank(),
        "node": ray.get_runtime_context().get_node_id(), "device": placed.device, "leased": placed.device_ids,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "own_gpus": ray.get_gpu_ids(), "device_error": device_error,
    })
    barrier = config["barrier"]
    ray.get(barrier.arrive.remote())
    wait_until(lambda: ray.get(barrier.count.remote()) >= config["expected"], timeout_s=BARRIER_TIMEOUT_S,
               interval_s=0.2, what="the other job's workers to arrive")


def _placement_trainer(pools: dict[str, int], job: str, storage: str, extra: dict):
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = validate_spec({"resources": {"pools": pools}})
    place = placement(spec)
    worker = WorkerConfig(model=spec.model, compression=spec.compression, loop=spec.train, seed=0,
                          device=spec.resources.device, node_devices=place.node_devices,
                          lease_devices=place.lease_devices)
    return TorchTrainer(_report_placement, train_loop_config={"worker": worker.model_dump(mode="json"), "job": job,
                                                              **extra},
                        torch_config=TorchConfig(backend=place.backend), scaling_config=place.scaling_config,
                        run_config=RunConfig(name=job, storage_path=storage))


def _drain(queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def test_two_mixed_device_jobs_on_one_gpu_node_get_distinct_devices(pool_cluster, tmp_path):
    import ray
    from ray.util.queue import Queue

    queue, barrier = Queue(), ray.remote(_Barrier).remote()
    extra = {"queue": queue, "barrier": barrier, "expected": 4}
    trainers = [_placement_trainer({"gpu": 1, "cpu-a": 1}, "job-a", str(tmp_path), extra),
                _placement_trainer({"gpu": 1, "cpu-b": 1}, "job-b", str(tmp_path), extra)]
    errors: list[BaseException] = []

    def fit(trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=fit, args=(t,)) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not errors and not any(t.is_alive() for t in threads), errors
    seen = _drain(queue)
    pools = pool_cluster.pools()
    assert sorted((w["job"], pools[w["node"]], w["device"]) for w in seen) == [
        ("job-a", "cpu-a", "cpu"), ("job-a", "gpu", "gpu"), ("job-b", "cpu-b", "cpu"), ("job-b", "gpu", "gpu")]
    gpu_workers = [w for w in seen if w["device"] == "gpu"]
    assert sorted(i for w in gpu_workers for i in w["leased"]) == ["0", "1"]  # distinct devices of the node
    for w in gpu_workers:
        assert len(w["leased"]) == 1 and w["visible"] == w["leased"][0]  # sees only its own device
        assert w["own_gpus"] == []  # its bundle holds CPUs only: the lease holds the device
        assert "torch.cuda.is_available() is False" in w["device_error"]  # fails clearly without CUDA
    for w in seen:
        if w["device"] == "cpu":
            assert w["leased"] == [] and w["device_error"] is None


def test_job_spanning_two_pools_trains_with_each_worker_in_its_pool(pool_cluster, shards_dir, tmp_path):
    from ray.util.queue import Queue
    from ray.util.state import list_actors

    from workers.data import build_shards
    from workers.progress import PROGRESS

    spec = load_spec(DEMO, [*TINY, f"data.path={shards_dir}", "train.steps=20", "train.split=speed",
                            "train.split_every=4", "resources.pools={cpu-a: 1, cpu-b: 1}"])
    manifest = build_shards(spec.data, lambda msg: None)

    def workers() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}

    before, queue = workers(), Queue()
    result = build_trainer(spec, manifest, tmp_path, progress=queue).fit()
    records = [r for kind, r in _drain(queue) if kind == PROGRESS]

    ours = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
            if a.actor_id not in before]
    pools = pool_cluster.pools()
    assert sorted(pools[a.node_id] for a in ours) == ["cpu-a", "cpu-b"]
    assert [r.step for r in records] == [5, 10, 15, 20]
    assert result.metrics["world_size"] == 2
    # From ~5.5 (uniform over bytes) down; 20 steps on batches drawn from the whole corpus.
    assert result.metrics["final_loss"] < records[0].loss - 0.15
