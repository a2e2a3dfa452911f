"""The data section's measured passes (tests/bench/data.py generates the sets and runs these over
them): one epoch through a worker's input path, through ``ray.data.read_parquet`` and through plain
pyarrow, consumed as the trainer consumes it; and a training run whose per-worker loop times its
wait for data."""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.specs.train import TrainSpec
from tests.bench.data import PeakMemory

# -- reading ------------------------------------------------------------------------------------


def trainer_batches(blocks: Iterator[np.ndarray], batch_rows: int) -> Iterator[Any]:
    """Packed rows cut into global batches of int64 tensors, what the training step takes."""
    import torch

    carry = np.empty((0, 0), dtype=np.uint16)
    for block in blocks:
        rows = np.concatenate([carry, block]) if len(carry) else block
        whole = len(rows) // batch_rows * batch_rows
        for start in range(0, whole, batch_rows):
            yield torch.from_numpy(rows[start:start + batch_rows].astype(np.int64))  # (batch_rows, seq_len + 1)
        carry = rows[whole:]


def _consume(blocks: Iterator[np.ndarray], spec: TrainSpec) -> dict[str, Any]:
    """Rows/s of ``trainer_batches`` over ``blocks``, and the seconds spent getting the blocks (the
    reader's share) apart from the rest (the loop's ordering, batching and tensors)."""
    batch_rows = spec.train.batch_size * spec.resources.max_workers
    source_s = 0.0

    def timed_blocks() -> Iterator[np.ndarray]:
        nonlocal source_s
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            source_s += time.perf_counter() - t0
            if block is None:
                return
            yield block

    started = time.perf_counter()
    rows, first_s, first_rows = 0, 0.0, 0
    for x in trainer_batches(timed_blocks(), batch_rows):
        if not rows:
            first_s, first_rows = time.perf_counter() - started, len(x)
        rows += len(x)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "first_batch_s": first_s,
            "steady_rows_per_s": (rows - first_rows) / (seconds - first_s), "reader_s": source_s,
            "batch_rows": batch_rows, "seq_len": spec.data.seq_len}


def _stream_pass(data: Any, spec: TrainSpec) -> tuple[dict[str, Any], Any]:
    """One epoch of the training split through a worker's input path (workers/data/stream.py, its
    Ray Data reads), as one rank taking the whole global batch, consumed in the driver."""
    from workers.data.stream import RankStream, ray_reads, state_for

    plan = data.plan("train", spec.data)
    rows = [spec.train.batch_size * spec.resources.max_workers]
    stream = RankStream(plan, state_for(plan, spec.seed, None), 0, ray_reads(plan))

    def blocks() -> Iterator[np.ndarray]:
        while stream.state.remaining() >= rows[0]:
            yield stream.next(rows)[1]

    result = _consume(blocks(), spec)
    stream.close()
    return result, stream


def ray_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """``_stream_pass`` with the memory sampled; with the Ray Data executions it started."""
    with PeakMemory() as mem:
        result, stream = _stream_pass(data, spec)
    return {**result, "memory": mem.result(), "executions": stream.executions, "units": len(stream.plan.units)}


SPEED_ROUNDS = 3


def speed_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """The stream vs pyarrow side by side: ``SPEED_ROUNDS`` rounds of one pass each, alternating,
    no memory sampler (its thread and RPCs would be charged to the stream alone); each side's median
    round. On this shared machine one kind of pass moves by a quarter from one minute to the next
    (pyarrow 0.59-0.94M rows/s in one process), so a ratio of passes minutes apart says little."""
    rounds = [(arrow_pass(data, spec), _stream_pass(data, spec)[0]) for _ in range(SPEED_ROUNDS)]
    median = lambda results: sorted(results, key=lambda r: r["rows_per_s"])[len(results) // 2]  # noqa: E731
    return {"arrow": median([a for a, _ in rounds]), "stream": median([r for _, r in rounds]),
            "ratios": [r["rows_per_s"] / a["rows_per_s"] for a, r in rounds]}


def read_parquet_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """The same pass with Ray Data's own parquet reader in place of the manifest-planned sources
    (the input path before them): ``read_parquet`` with a seeded file order,
    each block packed by a ``map_batches``."""
    import ray.data

    from workers.data.reader import pack_sequences

    ds = ray.data.read_parquet(data.shards["train"], filesystem=data.filesystem, columns=["tokens"],
                               shuffle=ray.data.FileShuffleConfig(seed=spec.seed, reseed_after_execution=False))
    ds = ds.map_batches(lambda t: {"input_ids": pack_sequences(t, spec.data.seq_len)}, batch_format="pyarrow",
                        batch_size=None)
    return _driver_pass(ds, spec)


def _driver_pass(ds: Any, spec: TrainSpec) -> dict[str, Any]:
    """``ds`` (packed rows) through Ray Train's DataConfig for the training split, consumed in the
    driver as the loop consumes it, with the memory sampled."""
    from ray.train import DataConfig

    it = DataConfig(datasets_to_split=[]).configure({"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
    with PeakMemory() as mem:
        result = _consume((b["input_ids"] for b in it.iter_batches(batch_size=None, batch_format="numpy")), spec)
    return {**result, "memory": mem.result()}


def arrow_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """The same files and consumer, each file read whole by pyarrow in this process (no Ray)."""
    from workers.data.reader import pack_sequences

    def blocks() -> Iterator[np.ndarray]:
        for path in data.shards["train"]:
            table = pq.read_table(path, columns=["tokens"], filesystem=data.filesystem)
            yield pack_sequences(table, spec.data.seq_len)

    return _consume(blocks(), spec)


# -- training -----------------------------------------------------------------------------------


def timed_loop(config: dict[str, Any], *, out: str) -> None:
    """The product's per-worker loop with its data position's ``next`` timed (this worker process
    only): each call's wait and the time it returned, written to ``out``/data-wait-rank<r>.json."""
    import ray.train

    import workers.loop as loop

    batches = loop._Position.next
    waits: list[float] = []
    returned: list[float] = []

    def timed(self: Any, rows: list[int]) -> Any:
        t0 = time.perf_counter()
        item = batches(self, rows)
        returned.append(time.perf_counter())
        waits.append(returned[-1] - t0)
        return item

    loop._Position.next = timed
    try:
        loop.train_loop_per_worker(config)
    finally:
        rank = ray.train.get_context().get_world_rank()
        Path(out, f"data-wait-rank{rank}.json").write_text(json.dumps({"waits": waits, "returned": returned}))


def wait_share(path: Path) -> dict[str, float]:
    """Share of the steady steps (all but the first, which waits for the pipeline to start) spent in
    ``next``: their waits over the time from the first batch's return to the last's."""
    t = json.loads(path.read_text())
    span = t["returned"][-1] - t["returned"][0]
    loop_s = t["returned"][-1] - (t["returned"][0] - t["waits"][0])  # from the first next() on
    return {"share": sum(t["waits"][1:]) / span, "step_s": span / (len(t["returned"]) - 1),
            "first_batch_s": t["waits"][0], "max_wait_s": max(t["waits"][1:]), "run_share": sum(t["waits"]) / loop_s}


def train_run(data: Any, spec: TrainSpec, out: Path) -> dict[str, Any]:
    from jobs.runtime.trainer import build_trainer

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trainer = build_trainer(spec, data, out, train_loop=functools.partial(timed_loop, out=str(out)))
    started = time.perf_counter()
    with PeakMemory() as mem:
        trainer.fit()
    ranks = [wait_share(p) for p in sorted(out.glob("data-wait-rank*.json"))]
    return {"seconds": time.perf_counter() - started, "steps": spec.train.steps, "memory": mem.result(),
            "ranks": ranks, "wait_share": max(r["share"] for r in ranks)}
