"""One multi-node Ray cluster on this machine, shared by the tests that need nodes of several pools.

``ray.cluster_utils.Cluster`` starts a real raylet per node (a process tree each: heavy on 2 cores),
so the session starts one ``PoolCluster`` (tests/conftest.py, ``pool_cluster``) and its tests share
it. Nodes carry the pool label of jobs/contracts/pools.py; the GPU node's GPUs are logical (Ray accounts for
them and assigns ids; nothing here can run CUDA). Tests that lose or add nodes (node loss,
autoscaling) use ``add_node`` / ``remove_node`` and put the cluster back as they found it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from jobs.contracts.pools import POOL_LABEL, pool_of

# Logical CPUs of the head: Ray Data's read/pack tasks of the tests' jobs (the Train controller
# actors take none).
HEAD_CPUS = 2
# The nodes every test finds: pool -> add_node arguments. cpu-a and cpu-b are labelled pools; the GPU
# node is unlabelled, so it is in the derived pool "gpu" (two workers' CPUs beside its two GPUs).
NODES: dict[str, dict[str, Any]] = {
    "cpu-a": {"num_cpus": 1, "labels": {POOL_LABEL: "cpu-a"}},
    "cpu-b": {"num_cpus": 1, "labels": {POOL_LABEL: "cpu-b"}},
    "gpu": {"num_cpus": 2, "num_gpus": 2},
}


class PoolCluster:
    """A head plus one node per entry of ``nodes`` (default ``NODES``; ``{}``: the head alone, for tests
    that add the nodes they need); the driver (this process) is connected to it."""

    def __init__(self, nodes: dict[str, dict[str, Any]] | None = None) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": HEAD_CPUS})
        self.nodes = {pool: self.add_node(**args) for pool, args in (NODES if nodes is None else nodes).items()}
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.cluster.wait_for_nodes()

    def add_node(self, **node_args: Any) -> Any:
        """Start one more node (``Cluster.add_node`` arguments: num_cpus, num_gpus, labels, ...)."""
        return self.cluster.add_node(**node_args)

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node)

    def drain_node(self, node: Any, reason_message: str, deadline_remaining_s: int) -> None:
        """Announce ``node``'s preemption as a cloud's reclaim would: the call behind `ray drain-node
        --reason DRAIN_NODE_REASON_PREEMPTION --reason-message ... --deadline-remaining-seconds N
        --node-id ...` (ray/scripts/scripts.py). Ray enforces no deadline: the caller removes the node."""
        import time

        import ray
        from ray.core.generated import autoscaler_pb2

        deadline_ms = time.time_ns() // 1_000_000 + deadline_remaining_s * 1000
        accepted, why = ray._raylet.GcsClient(address=self.cluster.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason_message,
            deadline_ms)
        if not accepted:
            raise RuntimeError(f"the drain of node {node.node_id} was refused: {why}")

    @staticmethod
    def pools() -> dict[str, str]:
        """Node id -> pool (jobs/contracts/pools.py) of every live node, from the GCS's node table (the same
        labels and resources the state API shows, without needing the dashboard process up)."""
        import ray

        return {n["NodeID"]: pool_of(n["Resources"], n.get("Labels") or {}) for n in ray.nodes() if n["Alive"]}

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def fit_watching(spec: Any, out: Any, on_event: Callable[[tuple[str, Any]], None], queue_size: int = 0,
                 timeout_s: float = 420.0) -> tuple[list[tuple[str, Any]], Any]:
    """Run ``spec``'s job to the end on the connected cluster (``build_trainer(...).fit()`` on a thread),
    calling ``on_event`` with each (kind, payload) progress record or note of rank 0 as it arrives,
    from this thread, so it may remove or drain nodes. Returns the events and Ray Train's result.
    ``queue_size`` 1: rank 0 waits at its next record until the last one has been taken, so the
    caller acts at the step it saw (0: rank 0 never waits). The queue lives on the driver's node,
    which no test removes."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.runtime.trainer import build_trainer
    from workers.data import build_shards

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=queue_size, actor_options={"scheduling_strategy": here})
    trainer = build_trainer(spec, build_shards(spec.data, lambda msg: None), out, progress=queue)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised by the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    events: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while (thread.is_alive() or not queue.empty()) and time.monotonic() < deadline:
        try:
            event = queue.get(timeout=1.0)
        except Empty:
            continue
        events.append(event)
        on_event(event)
    if thread.is_alive():
        raise TimeoutError(f"the job did not end within {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return events, outcome["result"]
