"""Elastic jobs that lose a node mid-run, on a multi-node cluster of this module (tests/support/cluster.py:
its head alone, without the pool nodes, which these jobs never use).

Each integration test runs an elastic [1, 2] job through ``build_trainer`` on two nodes that hold
exactly one worker each (``WORKER_CPUS`` is more than the head offers, so the job's workers land
only there); the nodes are added as needed and a node the first test keeps serves the second too:

- node loss: one node is removed while the job runs; Ray Train restarts the worker group on the
  worker that remains, from the latest checkpoint: at most a checkpoint interval of steps is lost
  and the loss curve goes on from where it was;
- preemption, with expert parallelism 2: one node is drained as preempted (what `ray drain-node
  --reason DRAIN_NODE_REASON_PREEMPTION` does) and removed once the job has answered the notice (a
  new node takes its place): the loop checkpoints at its next poll, with the drained rank's experts,
  and the job resumes from that checkpoint on 2 workers.

(The preemption watch on its own: tests/unit/workers/test_interrupts.py.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean
from typing import Any

import pytest

from jobs.specs.train import load_spec
from tests.conftest import DEMO, TINY
from tests.support.cluster import PoolCluster, fit_watching

# Logical CPUs of each worker and of each node added here: more than the head has
# (tests/support/cluster.py, HEAD_CPUS), so every node added holds exactly one of the job's workers.
WORKER_CPUS = 3
STEPS = 60
FIT_TIMEOUT_S = 420
GROUP_START_TIMEOUT_S = 20
# The loss over the steps after a resume may differ from the steps before it by this much
# (relative): the same weights and optimizer state, other batches (half the global batch after the
# resize). A job that lost its state starts again near 5.5 instead.
CONTINUATION_RTOL = 0.15
RESUMED = re.compile(r"resuming from step (\d+) \(saved by (\d+) workers, EP (\d+); now (\d+) workers, EP (\d+)\)")

Event = tuple[str, Any]  # (PROGRESS, ProgressRecord) or (NOTE, text): workers/progress.py


@pytest.fixture(scope="module")
def elastic_cluster() -> Iterator[PoolCluster]:
    """The head alone (its CPUs run Ray Data's tasks); the tests add the nodes for their workers."""
    cluster = PoolCluster(nodes={})
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def worker_nodes() -> list[Any]:
    """The live nodes added for jobs' workers, shared by this module's tests: a test removes from it
    the nodes it removes and appends those it adds."""
    return []


def _two_worker_nodes(cluster: PoolCluster, nodes: list[Any]) -> list[Any]:
    """``nodes``, topped up to two (the cluster's shutdown removes them at the module's end)."""
    while len(nodes) < 2:
        nodes.append(cluster.add_node(num_cpus=WORKER_CPUS))
    cluster.cluster.wait_for_nodes()
    return nodes


def _spec(shards_dir: Path, *sets: str):
    # No held-out pass: its Ray Data pipeline would only add start-up time.
    return load_spec(DEMO, [*TINY, f"data.path={shards_dir}", f"train.steps={STEPS}", "train.log_every=1",
                            "train.eval_batches=0",
                            "resources.num_workers=[1, 2]", f"resources.cpus_per_worker={WORKER_CPUS}", *sets])


def _resume(events: list[Event], saved_by: tuple[int, int], now: tuple[int, int]
            ) -> tuple[int, int, list[float], list[float]]:
    """The one resume, from a group of ``saved_by`` (workers, EP) to ``now``: its step, the last step
    logged before it, and the losses logged before and after it."""
    from workers.progress import NOTE, PROGRESS

    resumes = [i for i, (kind, text) in enumerate(events) if kind == NOTE and RESUMED.search(text)]
    assert len(resumes) == 1, events
    at = resumes[0]
    step, *sizes = map(int, RESUMED.search(events[at][1]).groups())
    assert (tuple(sizes[:2]), tuple(sizes[2:])) == (saved_by, now), events[at]
    before = [r for kind, r in events[:at] if kind == PROGRESS]
    after = [r for kind, r in events[at:] if kind == PROGRESS]
    assert [r.step for r in after] == list(range(step + 1, STEPS + 1))  # every step from the checkpoint on
    losses = {r.step: r.loss for r in before}
    return step, max(losses), [losses[s] for s in range(1, step + 1)], [r.loss for r in after]


def _assert_curve_continues(before: list[float], after: list[float]) -> None:
    window = 5
    assert mean(after[:window]) == pytest.approx(mean(before[-window:]), rel=CONTINUATION_RTOL)
    assert mean(after[:window]) < mean(before[:window]) - 0.3  # not from scratch (~5.5)


@pytest.mark.ray
def test_node_loss_continues_on_the_remaining_worker_from_the_latest_checkpoint(elastic_cluster, worker_nodes,
                                                                               shards_dir, tmp_path, monkeypatch):
    from workers.progress import PROGRESS

    # Ray Train retries at once, while the lost node's resources still show as ready: it first tries
    # two workers again and waits out the worker group start timeout (Ray's default 60 s; read from
    # the driver's environment) before it starts one.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(GROUP_START_TIMEOUT_S))

    every = 10
    spec = _spec(shards_dir, f"train.checkpoint_every={every}", "resources.preemption_check_every=0")
    removed_after: list[int] = []
    nodes = _two_worker_nodes(elastic_cluster, worker_nodes)

    def remove_a_node(event: Event) -> None:
        kind, record = event
        if kind == PROGRESS and record.step >= 2 * every + 2 and not removed_after:
            elastic_cluster.remove_node(nodes.pop(0))
            removed_after.append(record.step)

    events, result = fit_watching(spec, tmp_path, remove_a_node, timeout_s=FIT_TIMEOUT_S)
    resumed_at, last_logged, before, after = _resume(events, saved_by=(2, 1), now=(1, 1))
    assert removed_after and resumed_at >= 2 * every and resumed_at % every == 0
    assert removed_after[0] <= last_logged <= resumed_at + every  # at most a checkpoint interval lost
    _assert_curve_continues(before, after)
    assert result.metrics["world_size"] == 1 and result.metrics["steps"] == STEPS


@pytest.mark.ray
def test_preemption_notice_checkpoints_the_drained_experts_and_the_job_resumes_there(elastic_cluster, worker_nodes,
                                                                                    shards_dir, tmp_path, monkeypatch):
    """Expert parallelism 2 on two nodes: the drained node's rank owns half the experts, so the job
    continues correctly only if the notice's checkpoint holds them before the node goes. The cloud
    replaces the node (a new one is added as the old one is removed) and the job resumes on 2 workers."""
    from workers.progress import NOTE, PROGRESS

    # Ray Train's watcher looks for drained nodes every 5 s by default (read from the driver's
    # environment, handed to its controller); 1 s shortens the wait below.
    watcher_poll_s = 1.0
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", str(watcher_poll_s))

    poll = 5
    spec = _spec(shards_dir, "train.checkpoint_every=1000", f"resources.preemption_check_every={poll}",
                 "resources.num_workers=2", "resources.expert_parallel=2")
    drained_after: list[int] = []
    answered: list[str] = []
    nodes = _two_worker_nodes(elastic_cluster, worker_nodes)
    target = nodes[0]

    def preempt_a_node(event: Event) -> None:
        kind, payload = event
        if kind == PROGRESS and payload.step >= 20 and not drained_after:  # the loss has fallen by then
            elastic_cluster.drain_node(target, "test", deadline_remaining_s=30)
            drained_after.append(payload.step)
            # The tiny job would end before Ray Train's watcher sees the drain; rank 0 waits at
            # its next record (queue_size=1) until the watcher has had a few polls.
            time.sleep(3 * watcher_poll_s)
        elif kind == NOTE and "preemption notice" in payload and not answered:
            answered.append(payload)
            elastic_cluster.remove_node(target)  # the cloud takes the node once the job has answered
            nodes.remove(target)
            nodes.append(elastic_cluster.add_node(num_cpus=WORKER_CPUS))  # and gives another

    events, result = fit_watching(spec, tmp_path, preempt_a_node, queue_size=1, timeout_s=FIT_TIMEOUT_S)
    assert drained_after and len(answered) == 1, [e for e in events if e[0] == NOTE]
    notice = re.search(rf"checkpoint at step (\d+) on a preemption notice: node {target.node_id} \(ranks [01]\), "
                       r"deadline in \d+ s", answered[0])
    assert notice is not None, answered
    saved_at = int(notice.group(1))
    assert saved_at > drained_after[0] and saved_at % poll == 0  # the first poll that saw the drain
    resumed_at, _, before, after = _resume(events, saved_by=(2, 2), now=(2, 2))
    assert resumed_at == saved_at  # the notice's checkpoint, the only one before the end
    assert (tmp_path / "ray-train" / f"step-{saved_at:08d}" / "meta.json").exists()
    _assert_curve_continues(before, after)  # half the experts lost or stale would make it jump
    assert result.metrics["world_size"] == 2 and result.metrics["steps"] == STEPS
