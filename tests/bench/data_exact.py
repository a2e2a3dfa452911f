"""The data plane at scale (issue #24): what each worker reads, resuming, a read task's memory.

Measured on a prepared set (tests/bench/data.py ``make_shards``: row groups of ``ROW_GROUP_BYTES``):
- read amplification and aggregate rows/s at 1, 2, 4 ranks on the fake multi-node cluster (a
  ``ray.cluster_utils.Cluster`` started in a process of its own: a head of 0 CPUs and
  ``CLUSTER_NODES`` nodes of 1 CPU, a raylet and object store each): each rank is a Ray actor
  pinned to a node of its own, running the product's ``RankStream`` (workers/data/stream.py) over
  one epoch; its Ray Data read tasks go where Ray Data puts them (spread over the nodes' CPUs), and
  their blocks travel to the rank's node. The ranks step the same global position independently
  (it needs no messages), so they run in parallel. Amplification = stored bytes of the units the
  ranks' read tasks fetched / the split's.
- time to the first batch after a resume at 0%, 50% and 90% of an epoch: a fresh stream from the
  position saved there (the checkpoint's ``data_state``) vs skip-by-reading, the previous loop's
  way (every unit consumed so far read again, here with pyarrow in this process: its lower bound).
- peak RSS of one read task (a fresh process per read) against the row-group size, with a shard
  of one row group (an older preparation) beside them.
- the position's cost at 1 TiB (2**18 units of 4 MiB): planning, a step, the checkpoint's size.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

WORLDS = (1, 2, 4)
RESUME_AT = (0.0, 0.5, 0.9)
ROW_GROUP_BYTES = 4 * 1024 * 1024  # jobs.prepare's default
RSS_GROUP_BYTES = (1 << 20, 4 << 20, 16 << 20)
TIB_UNITS = 2**18  # 1 TiB of 4 MiB row groups
# The fake multi-node cluster: nodes of 1 CPU (a rank each at most, its read tasks beside), and the
# head with none (the driver's node runs no read task): 4 logical CPUs on a 2-core machine, as the
# section's embedded cluster has.
CLUSTER_NODES = max(WORLDS)
NODE_STORE_BYTES = 256 << 20  # object store per node: a rank's read-ahead (64 MiB) and transfers
REPO = Path(__file__).resolve().parents[2]


def _rank_actor() -> Any:
    import ray

    @ray.remote(num_cpus=0)  # its node's CPU is for read tasks; a rank mostly waits for them
    class Rank:
        """One rank's stream over an epoch: rows trained, seconds, stored bytes its reads fetched."""

        def epoch(self, plan: Any, seed: int, rank: int, rows: list[int]) -> dict[str, float]:
            from workers.data.stream import RankStream, ray_reads, state_for

            stream = RankStream(plan, state_for(plan, seed, None), rank, ray_reads(plan))
            started, got = time.perf_counter(), 0
            while stream.state.remaining() >= sum(rows):  # the epoch's last whole step, no further
                ids, _ = stream.next(rows)
                got += len(ids)
            return {"rows": got, "seconds": time.perf_counter() - started, "read_bytes": stream.read_bytes}

        def warm(self, plan: Any) -> None:
            """A short read, unmeasured: Ray Data's task processes start on the nodes it uses."""
            from workers.data.stream import ray_reads

            for _ in ray_reads(plan)(plan.units[:4]):
                pass

    return Rank


def amplification(plan: Any, seed: int, batch_size: int) -> dict[str, Any]:
    """The ranks' epochs at each world size on the fake multi-node cluster, run by a process of its
    own (this one is connected to the section's embedded cluster, and a driver joins one cluster)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.pkl").write_bytes(pickle.dumps((plan, seed, batch_size)))
        subprocess.run([sys.executable, "-m", "tests.bench.data_exact", tmp], cwd=REPO, check=True)
        return json.loads(Path(tmp, "out.json").read_text())


def _amplification_on_nodes(plan: Any, seed: int, batch_size: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": NODE_STORE_BYTES})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE_BYTES) for _ in range(CLUSTER_NODES)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        rank = _rank_actor()
        pinned = [rank.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)) for n in nodes]
        warm = [p.remote() for p in pinned]
        ray.get([a.warm.remote(plan) for a in warm])
        for a in warm:
            ray.kill(a)
        out = {}
        for world in WORLDS:
            actors = [pinned[r].remote() for r in range(world)]
            started = time.perf_counter()
            runs = ray.get([a.epoch.remote(plan, seed, r, [batch_size] * world) for r, a in enumerate(actors)])
            wall = time.perf_counter() - started
            for a in actors:
                ray.kill(a)
            rows = sum(r["rows"] for r in runs)
            out[str(world)] = {"read_ratio": sum(r["read_bytes"] for r in runs) / plan.stored_bytes(),
                               "rows": rows, "rows_per_s": rows / wall, "seconds": wall}
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


def resume_times(plan: Any, seed: int, batch_rows: int) -> dict[str, Any]:
    """First batch after a resume at each fraction of the epoch: the product's stream from the saved
    position, and skip-by-reading (the consumed units read and dropped) beside it."""
    from workers.data.order import DataState, Plan
    from workers.data.reader import read_unit
    from workers.data.stream import RankStream, ray_reads, state_for

    order = Plan(plan.units, plan.seq_len)
    out = {}
    for frac in RESUME_AT:
        state = DataState(order, seed)
        while state.consumed < frac * order.total:
            state.step([batch_rows])  # the position only: no read
        meta = json.loads(json.dumps({"epoch": 0, "sequences_in_epoch": state.consumed,
                                      "data_state": state.state_dict()}))
        started = time.perf_counter()
        stream = RankStream(plan, state_for(plan, seed, meta), 0, ray_reads(plan))
        stream.next([batch_rows])
        seek_s = time.perf_counter() - started
        stream.close()
        consumed = [plan.units[int(u)] for u in order.unit_order(seed, 0)[: state.next]]
        started = time.perf_counter()
        for unit in consumed:
            read_unit(plan.filesystem, unit, plan.seq_len, None)
        out[f"{frac:g}"] = {"seek_s": seek_s, "skip_by_reading_s": time.perf_counter() - started,
                            "consumed_units": len(consumed)}
    return out


def _task_rss(path: str, row_group: int | None, tokens: int, sha: str, stored: int, seq_len: int) -> dict[str, int]:
    """In a fresh process: RSS before, and the peak while reading one unit (the kernel's high-water
    mark, reset first: writing 5 to /proc/self/clear_refs)."""
    import pyarrow.fs as pafs

    from workers.data.order import Unit
    from workers.data.reader import read_unit

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    read_unit(pafs.LocalFileSystem(), Unit(path, row_group, tokens, sha, stored), seq_len, None)
    return {"before": before, "peak": status("VmHWM:")}


def task_memory(scratch: Path, seq_len: int) -> dict[str, Any]:
    """Peak RSS growth of a read task per row-group size (``RSS_GROUP_BYTES``) and for a shard of one
    row group (the whole shard decoded, as before), each in a fresh worker process."""
    import ray

    from tests.bench.data import SHARD_TOKENS, random_docs
    from workers.data.manifest import sha256_hex
    from workers.data.shards import write_shard

    task = ray.remote(max_calls=1, num_cpus=0.5)(_task_rss)
    docs = random_docs(np.random.default_rng(0), SHARD_TOKENS)
    scratch.mkdir(parents=True, exist_ok=True)
    out = {}
    for group_bytes in (*RSS_GROUP_BYTES, None):
        raw, groups = write_shard([""] * len(docs), docs, group_bytes or 2**40)
        path = scratch / f"rss-{group_bytes}.parquet"
        path.write_bytes(raw)
        g = groups[0]
        args = (str(path), 0, g.tokens, g.sha256, g.stored_bytes) if group_bytes else \
            (str(path), None, g.tokens, sha256_hex(raw), len(raw))
        got = ray.get(task.remote(*args, seq_len))
        out["whole shard" if group_bytes is None else f"{group_bytes >> 20} MiB"] = {
            "tokens": g.tokens, "growth_bytes": max(0, got["peak"] - got["before"])}
        path.unlink()
    return out


def position_cost() -> dict[str, Any]:
    """The global position at 1 TiB: planning an epoch, a step of 8 ranks x 16 rows, its checkpoint."""
    from workers.data.order import DataState, Plan, Unit

    units = [Unit(f"s{i // 8:06d}.parquet", i % 8, 2 * 2**20, "0" * 64, 4 * 2**20) for i in range(TIB_UNITS)]
    started = time.perf_counter()
    state = DataState(Plan(units, 128), 0)
    plan_s = time.perf_counter() - started
    steps, started = 2000, time.perf_counter()
    for _ in range(steps):
        state.step([16] * 8)
    return {"units": TIB_UNITS, "plan_s": plan_s, "step_us": (time.perf_counter() - started) / steps * 1e6,
            "checkpoint_bytes": len(json.dumps(state.state_dict())), "plan_pickle_bytes": len(pickle.dumps(units))}


def exact_section(data: Any, spec: Any, scratch: Path) -> dict[str, Any]:
    plan = data.plan("train", spec.data)
    return {"amplification": amplification(plan, spec.seed, spec.train.batch_size),
            "resume": resume_times(plan, spec.seed, spec.train.batch_size * spec.resources.max_workers),
            "task_memory": task_memory(scratch / "rss", spec.data.seq_len), "position": position_cost(),
            "units": len(plan.units), "stored_bytes": plan.stored_bytes()}


def exact_markdown(r: dict[str, Any], size_gb: float) -> list[str]:
    amp, res, mem, pos = r["amplification"], r["resume"], r["task_memory"], r["position"]
    md = ["", f"Reading each sequence once ({size_gb:g} GB set, {r['units']} row groups of "
              f"{ROW_GROUP_BYTES >> 20} MiB; tests/bench/data_exact.py), on the fake multi-node cluster "
              f"(`ray.cluster_utils.Cluster`: a head of 0 CPUs and {CLUSTER_NODES} nodes of 1 CPU, a raylet and "
              "object store each, on this one machine): each rank a Ray actor on a node of its own running the "
              "product's stream over one epoch (it steps the shared position itself, no messages), its read "
              "tasks spread over the nodes by Ray Data, batch 16 per rank. Read amplification = stored bytes "
              "the ranks' read tasks fetched / the split's (goal 1.00; the previous loop: N, every rank read "
              "everything):", "",
          "| ranks | bytes read / dataset bytes | aggregate rows/s | s |", "|---:|---:|---:|---:|"]
    md += [f"| {w} | **{a['read_ratio']:.3f}** | {a['rows_per_s']:,.0f} | {a['seconds']:.0f} |" for w, a in amp.items()]
    md += ["", "First batch after a resume (goal: flat, <= 1 s): a fresh stream from the checkpoint's position "
               "(one Ray Data read from the unit it resumes in) vs skip-by-reading, the previous loop's way (every "
               "unit consumed so far read again; here pyarrow in-process, its lower bound):", "",
           "| resumed at | first batch s | skip-by-reading s | units consumed |", "|---:|---:|---:|---:|"]
    md += [f"| {float(f):.0%} | **{x['seek_s']:.2f}** | {x['skip_by_reading_s']:.1f} | {x['consumed_units']} |"
           for f, x in res.items()]
    md += ["", "Peak RSS growth of one read task (a fresh process) by row-group size; 'whole shard' = a 32 Mi-token "
               "shard of one row group, as preparations before row groups wrote it:", "",
           "| row group | tokens | MiB peak growth |", "|---|---:|---:|"]
    md += [f"| {k} | {v['tokens']:,} | {v['growth_bytes'] / 2**20:.0f} |" for k, v in mem.items()]
    md += ["", f"The position at 1 TiB ({pos['units']:,} units): planning an epoch {pos['plan_s']:.2f} s, a step "
               f"(8 ranks x 16 rows) {pos['step_us']:.0f} us, the checkpoint's `data_state` {pos['checkpoint_bytes']} "
               f"bytes, the plan sent to each worker {pos['plan_pickle_bytes'] / 2**20:.0f} MiB pickled."]
    return md


if __name__ == "__main__":  # amplification()'s process: its arguments and result in the folder named
    folder = Path(sys.argv[1])
    result = _amplification_on_nodes(*pickle.loads(Path(folder, "in.pkl").read_bytes()))
    Path(folder, "out.json").write_text(json.dumps(result))
