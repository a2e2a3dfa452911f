"""Elastic benchmark, node rows: a node lost mid-run, and a node drained as preempted.

One ``PoolCluster`` (tests/support/cluster.py: a real raylet per node) with two nodes added for each row, of
``WORKER_CPUS`` each, more than any standing node offers, so each holds exactly one of the job's two
workers. An elastic [1, 2] tiny ``jobs.train`` job runs on them through ``build_trainer``, as
tests/integration/training/test_elastic.py does; rank 0's records and notes come through a Ray queue and are stamped
with the time the driver got them, so the figures are the times a user of the job would see:

- node loss: one node is removed mid-run; from the removal to the next step, the steps lost (the
  last step logged before the loss minus the step the job resumed from; at most the checkpoint
  interval);
- drain: one node is drained as preempted (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`
  with a deadline); from the drain call to the notice's checkpoint being on disk, the steps between,
  then the node is removed and the job resumes from that checkpoint on the remaining worker.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.specs.train import load_spec

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "examples" / "demo.yaml"
WORKER_CPUS = 3  # per worker and per node added: more than any standing node of the PoolCluster
LOSS_STEPS = 60
LOSS_CHECKPOINT_EVERY = 10
LOSS_AFTER_STEP = 2 * LOSS_CHECKPOINT_EVERY + 2  # remove the node once this step is logged: mid-interval
# Long enough that the job is still training when Ray Train's controller, which polls for drains
# every 5 s, has seen the drain and the loop has asked at its next poll.
DRAIN_STEPS = 600  # long enough that Train's drain poll (every 5 s) sees the notice before the end
DRAIN_AFTER_STEP = 20  # the loss has fallen by then, so a resume from scratch would show
PREEMPTION_CHECK_EVERY = 5  # resources.preemption_check_every: the loop asks Ray Train every k steps
DRAIN_DEADLINE_S = 30
# Ray Train restarts at once, while the lost node's resources still show: it first retries the old
# size and waits out this timeout (Ray's default 60 s, read from the driver's environment) before it
# starts the group on the worker that remains.
GROUP_START_TIMEOUT_S = 20
FIT_TIMEOUT_S = 600.0
DISK_POLL_S = 0.05
RESUMED = re.compile(r"resuming from step (\d+) \(saved by \d+ workers")
NOTICE = re.compile(r"checkpoint at step (\d+) on a preemption notice")


@dataclass(frozen=True)
class _Event:
    at: float  # unix seconds, when the driver got it
    kind: str  # PROGRESS or NOTE (workers/progress.py)
    payload: Any  # a ProgressRecord or the note's text


def _spec(data_dir: Path, tiny: list[str], steps: int, *sets: str):
    # No held-out pass: its Ray Data pipeline would only add start-up time.
    return load_spec(DEMO, [*tiny, f"data.path={data_dir}", f"train.steps={steps}", "train.log_every=1",
                            "train.eval_batches=0", "resources.num_workers=[1, 2]",
                            f"resources.cpus_per_worker={WORKER_CPUS}", *sets])


@contextmanager
def _two_worker_nodes(cluster) -> Iterator[list[Any]]:
    """Two nodes for the job's workers; the ones the row has not removed are removed after it."""
    nodes = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
    cluster.cluster.wait_for_nodes()
    try:
        yield nodes
    finally:
        for node in nodes:
            cluster.remove_node(node)


def _holding_a_worker(nodes: list[Any]) -> list[Any]:
    """The nodes among ``nodes`` that hold one of the job's workers, from the GCS's actor table (no
    dashboard needed). Ray Train's elastic start may begin with one worker, before the other node's
    reservation shows: removing or draining the idle node would measure nothing."""
    import ray

    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    hosts = {a["Address"]["NodeID"] for a in alive if a["ActorClassName"] == "RayTrainWorker"}
    return [n for n in nodes if n.node_id in hosts]


def _fit(spec, out: Path, on_event: Callable[[_Event], None]) -> list[_Event]:
    """Run ``spec``'s job to the end (tests/support/cluster.py ``fit_watching``), calling ``on_event`` with each
    record and note, stamped as it arrives. The queue holds one event: rank 0 waits at its next record
    until the driver has taken the last, so the driver acts at the step it saw (on a loaded machine it
    would otherwise fall behind, and a tiny job could end before the driver acts). ``out`` starts
    empty: a checkpoint left there by an earlier bench would be resumed from."""
    from tests.support.cluster import fit_watching

    shutil.rmtree(out, ignore_errors=True)
    events: list[_Event] = []

    def stamp(event: tuple[str, Any]) -> None:
        events.append(_Event(time.time(), *event))
        on_event(events[-1])

    _, result = fit_watching(spec, out, stamp, queue_size=1, timeout_s=FIT_TIMEOUT_S)
    if result.metrics["world_size"] != 1:
        raise AssertionError(f"the job ended on {result.metrics['world_size']} workers, not the one left")
    return events


def _resume(events: list[_Event]) -> tuple[int, int, _Event]:
    """The one resume: the step it resumed from, the last step logged before it, and the first record after it."""
    from workers.progress import NOTE, PROGRESS

    resumes = [i for i, e in enumerate(events) if e.kind == NOTE and RESUMED.search(e.payload)]
    if len(resumes) != 1:
        raise AssertionError(f"expected one resume, got {[e.payload for e in events if e.kind == NOTE]}")
    at = resumes[0]
    step = int(RESUMED.search(events[at].payload).group(1))
    last = max(e.payload.step for e in events[:at] if e.kind == PROGRESS)
    first = next(e for e in events[at:] if e.kind == PROGRESS)
    if first.payload.step != step + 1:
        raise AssertionError(f"resumed from step {step} but first logged step {first.payload.step}")
    return step, last, first


def node_loss(cluster, data_dir: Path, tiny: list[str], out: Path) -> dict:
    from workers.progress import PROGRESS

    spec = _spec(data_dir, tiny, LOSS_STEPS, f"train.checkpoint_every={LOSS_CHECKPOINT_EVERY}",
                 "resources.preemption_check_every=0")
    removed: list[tuple[float, int, int]] = []  # (when the removal started, the last step logged, workers)
    with _two_worker_nodes(cluster) as nodes:

        def remove_a_node(event: _Event) -> None:
            if event.kind == PROGRESS and event.payload.step >= LOSS_AFTER_STEP and not removed:
                holders = _holding_a_worker(nodes)
                if holders:  # else: the next record
                    removed.append((time.time(), event.payload.step, len(holders)))
                    nodes.remove(holders[0])
                    cluster.remove_node(holders[0])

        events = _fit(spec, out, remove_a_node)
    resumed_at, last_logged, first = _resume(events)
    return {"checkpoint_every": LOSS_CHECKPOINT_EVERY, "removed_at_step": removed[0][1], "workers_before": removed[0][2],
            "last_step_before": last_logged, "resumed_from": resumed_at, "steps_lost": last_logged - resumed_at,
            "removal_to_next_step_s": round(first.at - removed[0][0], 1),
            "group_start_timeout_s": GROUP_START_TIMEOUT_S}


class _DiskWatch:
    """The first checkpoint folder of Ray Train's run to have its meta.json on disk, and when it was seen."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen = run_dir, None  # seen: (unix seconds, step)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set() and self.seen is None:
            steps = sorted(int(p.parent.name.removeprefix("step-")) for p in self.run_dir.glob("step-*/meta.json"))
            if steps:
                self.seen = (time.time(), steps[0])
            self._stop.wait(DISK_POLL_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def drain(cluster, data_dir: Path, tiny: list[str], out: Path) -> dict:
    from jobs.runtime.trainer import RUN_NAME
    from workers.progress import NOTE, PROGRESS

    # No interval checkpoint before the end: the notice's is the first on disk.
    spec = _spec(data_dir, tiny, DRAIN_STEPS, f"train.checkpoint_every={DRAIN_STEPS}",
                 f"resources.preemption_check_every={PREEMPTION_CHECK_EVERY}")
    watch = _DiskWatch(out / RUN_NAME)
    drained: list[tuple[float, int, int, Any]] = []  # (when the drain was asked, the last step logged, workers, node)
    notices: list[str] = []
    with _two_worker_nodes(cluster) as nodes:

        def preempt_a_node(event: _Event) -> None:
            if event.kind == PROGRESS and event.payload.step >= DRAIN_AFTER_STEP and not drained:
                holders = _holding_a_worker(nodes)
                if holders:  # else: the next record
                    watch.start()
                    drained.append((time.time(), event.payload.step, len(holders), holders[0]))
                    cluster.drain_node(holders[0], "bench", deadline_remaining_s=DRAIN_DEADLINE_S)
            elif event.kind == NOTE and NOTICE.search(event.payload) and not notices:
                notices.append(event.payload)
                target = drained[0][3]
                nodes.remove(target)
                cluster.remove_node(target)  # the cloud takes the node once the job has answered

        try:
            events = _fit(spec, out, preempt_a_node)
        finally:
            if drained:
                watch.stop()
    if not notices or watch.seen is None:
        raise AssertionError(f"no checkpoint on the preemption notice (drain: {drained[0][:3] if drained else None}; "
                             f"notes: {[e.payload for e in events if e.kind == NOTE]})")
    saved_at = int(NOTICE.search(notices[0]).group(1))
    seen_at, on_disk = watch.seen
    if on_disk != saved_at:
        raise AssertionError(f"the first checkpoint on disk is step {on_disk}, the notice's is step {saved_at}")
    resumed_at, last_logged, first = _resume(events)
    return {"check_every": PREEMPTION_CHECK_EVERY, "deadline_s": DRAIN_DEADLINE_S, "drained_at_step": drained[0][1],
            "workers_before": drained[0][2],
            "checkpoint_step": saved_at, "steps_to_checkpoint": saved_at - drained[0][1],
            "drain_to_checkpoint_on_disk_s": round(seen_at - drained[0][0], 1), "resumed_from": resumed_at,
            "last_step_before": last_logged, "steps_redone": last_logged - resumed_at,
            "drain_to_next_step_s": round(first.at - drained[0][0], 1)}


def node_rows(scratch: Path, data_dir: Path, tiny: list[str]) -> dict:
    """Both rows on one PoolCluster (started here, torn down after)."""
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    from tests.support.cluster import PoolCluster

    previous = os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(GROUP_START_TIMEOUT_S)
    cluster = PoolCluster()
    try:
        return {"node_loss": node_loss(cluster, data_dir, tiny, scratch / "node-loss"),
                "drain": drain(cluster, data_dir, tiny, scratch / "drain")}
    finally:
        cluster.shutdown()
        if previous is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = previous


def markdown(rows: dict) -> list[str]:
    loss, dr = rows["node_loss"], rows["drain"]
    return ["Node loss and drain: a `PoolCluster` (tests/support/cluster.py, a real raylet per node) with two nodes of "
            f"{WORKER_CPUS} CPUs added, an elastic `[1, 2]` tiny `jobs.train` job through `build_trainer` (no "
            "held-out pass); the node removed or drained is one that holds a worker. Times are when the driver "
            "got rank 0's record; rank 0 waits at each record until the driver has taken the last, so the "
            "driver acts at the step it saw. "
            f"`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S={GROUP_START_TIMEOUT_S}`: Ray Train restarts at once, "
            "while the lost node still shows its resources, so it first retries the old size and waits out "
            "this timeout (default 60 s) before it starts the worker that remains; it is most of the time to "
            "the next step.", "",
            "| node lost | workers before | checkpoint every (steps) | removed at step | last step before | "
            "resumed from | steps lost | removal -> next step (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| removed mid-run | {loss['workers_before']} | {loss['checkpoint_every']} | {loss['removed_at_step']} | "
            f"{loss['last_step_before']} | {loss['resumed_from']} | {loss['steps_lost']} | "
            f"{loss['removal_to_next_step_s']} |", "",
            f"Drain: the node is drained as preempted (deadline {dr['deadline_s']} s, no checkpoint before the "
            "end but the notice's); Ray Train's controller polls for drains every 5 s and the loop asks it every "
            "k steps, checkpoints at the first poll that sees the notice, and trains on until the node goes (a "
            "notice asks for no hold). Here the node is removed as soon as the notice's note arrives, while rank "
            "0 waits at its next record, so the steps redone are a lower bound: a cloud takes the node at the "
            "deadline and the steps made until then are redone.", "",
            "| poll every k (steps) | workers before | drained at step | checkpoint step | steps drain -> checkpoint | "
            "drain -> checkpoint on disk (s) | last step before | resumed from | steps redone | "
            "drain -> next step (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {dr['check_every']} | {dr['workers_before']} | {dr['drained_at_step']} | {dr['checkpoint_step']} | "
            f"{dr['steps_to_checkpoint']} | {dr['drain_to_checkpoint_on_disk_s']} | {dr['last_step_before']} | "
            f"{dr['resumed_from']} | {dr['steps_redone']} | {dr['drain_to_next_step_s']} |"]
