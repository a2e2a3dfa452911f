"""The data plane (issue #15): memory as the dataset grows, Ray Data vs a raw pyarrow read, the
trainer's wait for data, and preparation throughput, side by side in one run.

Shards are generated straight in the prepared format (workers/corpus: ``shard_table``, the shard
writer's parquet settings, ``Manifest``), so ``open_training_data`` reads and verifies them as it
would a ``jobs.prepare`` output: documents of random byte ids (1..255, EOS 0; the bytes tokenizer),
``SHARD_TOKENS`` tokens per shard, the size of ``jobs.prepare``'s default shard. Random ids do not
compress, so a shard holds about one token per byte on disk (two in memory, uint16): "GB" here are
gigabytes of shard files. ``DISTINCT_SHARDS`` shards are drawn and the rest of a set are copies of
them (separate files, so separate reads and page-cache pages): readers do not care what the ids
are, and drawing and encoding every shard would take most of the section's time on 2 cores.

Measured, for a small and an 8x larger set (``SIZES_GB``, overridden by ``MOE_BENCH_DATA_GB``):
- a data-only pass over the whole set through the trainer's own input path (jobs/trainer.py's
  DataConfig on workers/data.py's ``make_datasets``, consumed as workers/loop.py does: windows in
  the training order, global batches, int64 tensors) in the driver, and a fixed-step training run
  (``build_trainer(...).fit()`` on the demo spec); during each, a thread samples the summed RSS of
  the driver and every Ray worker process (the raylet's children) and the object store's used bytes.
- rows/s of global batches through that path vs the same consumer fed by ``pyarrow.parquet``
  reading the same files one after the other in this process (no Ray).
- the share of a training step spent waiting for data: this module's per-worker function wraps the
  product loop's batch iterator (``workers.loop._batches``, in the worker process only; the loop does
  not know) and times each ``next()`` against the time between steps.
- ``jobs.prepare``'s pipeline (``prepare`` with ``ray_runner``) on a slice of the standard library
  with the bytes and the BPE tokenizer: input MB/s per core, and BPE tokens per input byte.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.specs import TrainSpec, load_spec
from tests.conftest import DEMO

SIZES_ENV = "MOE_BENCH_DATA_GB"  # "SMALL,LARGE" in GB of shard files, e.g. "1,8"
# The issue asks for 1 GB vs 8 GB. On the shared 2-core machine these figures were first taken on
# (load average 40 to 200 from other users), the trainer's input path moved ~30k rows/s (~4M
# tokens/s: see ``ordering_cost``), so one pass over 8 GB (8G tokens) would take over half an hour,
# past the ~20 minutes the section may take; 0.125 vs 1 GB keeps the 8x ratio.
SIZES_GB = (0.125, 1.0)
GB = 1e9
MB = 1e6
SHARD_TOKENS = 32 * 1024 * 1024  # jobs.prepare's default shard: 32 MiB of input, one byte token each
DISTINCT_SHARDS = 8
DOC_TOKENS = (1_000, 50_000)  # uniform document lengths (a standard-library file averages ~25 KB)
BYTE_IDS = (1, 256)  # random ids drawn in [1, 256): every byte but EOS (0)
SAMPLE_EVERY_S = 0.2  # memory sampling period
IDLE_WORKER = "ray::IDLE"  # the process title of a pooled Ray worker with no task
TRAIN_STEPS = 30
# The demo spec, trimmed: no checkpoint before the end, no eval, a progress record every 10 steps.
SETS = ["train.checkpoint_every=100000", "train.eval_batches=0", "train.log_every=10", "resources.max_failures=0"]
PREP_INPUT_BYTES = 16_000_000  # the standard-library slice prepared with each tokenizer
PREP_SHARD_BYTES = 2_000_000  # small shards, so every task slot has several
PREP_WARMUP_BYTES = 4_000_000  # an unmeasured first preparation: Ray starts its task processes
PREP_TASKS = os.cpu_count() or 1
BPE_VOCAB = 8192
ORDERING_BATCH_ROWS = 32  # the demo's global batch (2 workers x 16)
GOALS = {"memory_ratio": 1.2, "ray_vs_arrow": 0.7, "wait_share": 0.05}


def sizes_gb() -> tuple[float, float]:
    raw = os.environ.get(SIZES_ENV)
    if not raw:
        return SIZES_GB
    small, large = (float(x) for x in raw.split(","))
    if not 0 < small < large:
        raise ValueError(f"{SIZES_ENV}={raw!r}: expected SMALL,LARGE in GB with 0 < SMALL < LARGE")
    return small, large


# -- shards -------------------------------------------------------------------------------------


def _random_shard(rng: np.random.Generator) -> tuple[bytes, int, int]:
    """One shard file's bytes in the prepared format, and its rows and tokens."""
    from workers.corpus.shards import PARQUET_COMPRESSION, shard_table

    tokens = rng.integers(*BYTE_IDS, SHARD_TOKENS, dtype=np.uint16)  # (tokens,)
    ends = np.cumsum(rng.integers(*DOC_TOKENS, SHARD_TOKENS // DOC_TOKENS[0]))
    ends = np.append(ends[ends < SHARD_TOKENS], SHARD_TOKENS)  # (docs,) end offset of each document
    tokens[ends - 1] = 0  # EOS ends every document
    docs = np.split(tokens, ends[:-1])
    sink = pa.BufferOutputStream()
    pq.write_table(shard_table([f"doc-{i}" for i in range(len(docs))], docs), sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes(), len(docs), SHARD_TOKENS


def make_shards(root: Path, size_bytes: float, pool: Path) -> dict[str, Any]:
    """A prepared dataset of at least ``size_bytes`` of shard files under ``root`` (module docstring);
    ``pool`` holds the distinct shards, drawn once and shared by every size."""
    from workers.corpus.manifest import (
        FileEntry,
        Manifest,
        ShardEntry,
        SplitEntry,
        TokenizerEntry,
        write_manifest,
    )
    from workers.storage import open_fs
    from workers.tokenizer import ByteTokenizer

    pool.mkdir(parents=True, exist_ok=True)
    meta_path = pool / "pool.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else []
    rng = np.random.default_rng(len(meta))
    while len(meta) < DISTINCT_SHARDS:
        raw, rows, tokens = _random_shard(rng)
        name = f"pool-{len(meta):02d}.parquet"
        (pool / name).write_bytes(raw)
        meta.append({"name": name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "rows": rows,
                     "tokens": tokens})
        meta_path.write_text(json.dumps(meta))
    shutil.rmtree(root, ignore_errors=True)
    shard_dir = "shards-bench"
    (root / shard_dir).mkdir(parents=True)
    entries, total = [], 0
    while total < size_bytes:
        src = meta[len(entries) % DISTINCT_SHARDS]
        file = f"{shard_dir}/train-{len(entries):05d}.parquet"
        shutil.copyfile(pool / src["name"], root / file)
        entries.append(ShardEntry(file=file, bytes=src["bytes"], sha256=src["sha256"], split="train", rows=src["rows"],
                                  tokens=src["tokens"], documents=src["rows"], input_bytes=src["tokens"],
                                  skipped_binary=0))
        total += src["bytes"]
    tok = ByteTokenizer().to_json().encode()
    (root / shard_dir / "tokenizer.json").write_bytes(tok)
    tok_entry = FileEntry(file=f"{shard_dir}/tokenizer.json", bytes=len(tok), sha256=hashlib.sha256(tok).hexdigest())
    splits = {"train": SplitEntry(rows=sum(e.rows for e in entries), tokens=sum(e.tokens for e in entries),
                                  documents=sum(e.documents for e in entries), shards=entries),
              "val": SplitEntry(rows=0, tokens=0, documents=0, shards=[])}
    manifest = Manifest(created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                        source="random byte ids (tests/bench/data.py)", fingerprint=f"bench-{len(entries)}",
                        shard_dir=shard_dir, pack_len=None,
                        tokenizer=TokenizerEntry(**tok_entry.model_dump(), kind="bytes", vocab_size=256, eos_id=0),
                        input_files=splits["train"].documents, input_bytes=splits["train"].tokens, skipped_binary=0,
                        splits=splits, spec={"generated_bytes": total, "distinct_shards": DISTINCT_SHARDS})
    write_manifest(*open_fs(str(root)), manifest)
    return {"shards": len(entries), "bytes": total, "tokens": splits["train"].tokens}


# -- memory -------------------------------------------------------------------------------------


class PeakMemory:
    """Peaks, sampled every ``SAMPLE_EVERY_S`` on a thread while in the ``with`` block: the summed RSS
    of the driver and every busy Ray worker process (the raylet's children: Train workers and
    controller, Ray Data tasks and actors; not the pooled ``ray::IDLE`` ones, which keep what earlier
    work loaded, e.g. torch after a training run, and would make a later pass look bigger), the same
    without shared pages (RSS counts the object store's pages each process has mapped, so the plain
    sum counts them once per reader), and the object store's used bytes (``ray memory --stats-only``)."""

    def __init__(self) -> None:
        import psutil  # Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._psutil = psutil
        self.driver = psutil.Process()
        raylets = [p for p in self.driver.children(recursive=True) if p.name() == "raylet"]
        if len(raylets) != 1:
            raise RuntimeError(f"expected the embedded cluster's one raylet among this process's children, "
                               f"found {len(raylets)}")
        self.raylet = raylets[0]
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._store = lambda: get_memory_info_reply(state).store_stats
        self.peak = {"rss_bytes": 0, "private_bytes": 0, "store_bytes": 0}
        self.idle: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        rss = private = 0
        for p in [self.driver, *self.raylet.children()]:
            try:
                if p.name() == IDLE_WORKER:
                    continue
                m = p.memory_info()
            except self._psutil.Error:  # a worker that just exited
                continue
            rss, private = rss + m.rss, private + m.rss - m.shared
        return {"rss_bytes": rss, "private_bytes": private, "store_bytes": self._store().object_store_bytes_used}

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> PeakMemory:
        self.idle = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, Any]:
        return {"peak": self.peak, "idle": self.idle, "store_capacity_bytes": self._store().object_store_bytes_avail}


# -- reading ------------------------------------------------------------------------------------


def trainer_batches(blocks: Iterator[np.ndarray], batch_rows: int, seed: int) -> Iterator[Any]:
    """One epoch of what workers/loop.py's ``_batches`` hands the training step: packed blocks put in
    the training order, cut into global batches, made int64 tensors."""
    import torch

    from workers import order

    for _, rows in order.global_batches(order.ordered_rows(blocks, seed, 0), batch_rows, 0):
        yield torch.from_numpy(rows.astype(np.int64))  # (batch_rows, seq_len + 1)


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
    for x in trainer_batches(timed_blocks(), batch_rows, spec.seed):
        if not rows:
            first_s, first_rows = time.perf_counter() - started, len(x)
        rows += len(x)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "first_batch_s": first_s,
            "steady_rows_per_s": (rows - first_rows) / (seconds - first_s), "reader_s": source_s,
            "batch_rows": batch_rows, "seq_len": spec.data.seq_len}


def ordering_cost(block_rows: int, seq_len: int, pieces: int) -> float:
    """Rows/s of ``trainer_batches`` alone (no reader) over ``block_rows`` random rows handed over as
    ``pieces`` blocks: how the loop's ordering scales with the size of the blocks it is given."""
    rows = np.random.default_rng(0).integers(*BYTE_IDS, (block_rows, seq_len + 1), dtype=np.uint16)
    started = time.perf_counter()
    n = sum(len(x) for x in trainer_batches(iter(np.array_split(rows, pieces)), ORDERING_BATCH_ROWS, 0))
    return n / (time.perf_counter() - started)


def ray_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """The whole training split through the trainer's input path, consumed in the driver."""
    from jobs.trainer import data_config
    from workers.data import make_datasets

    ds = make_datasets(data, spec.data.seq_len, spec.seed)["train"]
    it = data_config().configure({"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
    with PeakMemory() as mem:
        result = _consume((b["input_ids"] for b in it.iter_batches(batch_size=None, batch_format="numpy")), spec)
    return {**result, "memory": mem.result()}


def arrow_pass(data: Any, spec: TrainSpec) -> dict[str, Any]:
    """The same files and consumer, each file read whole by pyarrow in this process (no Ray)."""
    from workers.data import pack_sequences

    def blocks() -> Iterator[np.ndarray]:
        for path in data.shards["train"]:
            table = pq.read_table(path, columns=["tokens"], filesystem=data.filesystem)
            yield pack_sequences(table, spec.data.seq_len)["input_ids"]

    return _consume(blocks(), spec)


# -- training -----------------------------------------------------------------------------------


def timed_loop(config: dict[str, Any], *, out: str) -> None:
    """The product's per-worker loop with its batch iterator timed (this worker process only): each
    ``next()``'s wait and the time it returned, written to ``out``/data-wait-rank<r>.json."""
    import ray.train

    import workers.loop as loop

    batches = loop._batches
    waits: list[float] = []
    returned: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        it = batches(*args, **kwargs)  # endless: a new epoch when one runs out
        while True:
            t0 = time.perf_counter()
            item = next(it)
            returned.append(time.perf_counter())
            waits.append(returned[-1] - t0)
            yield item

    loop._batches = timed
    try:
        loop.train_loop_per_worker(config)
    finally:
        rank = ray.train.get_context().get_world_rank()
        Path(out, f"data-wait-rank{rank}.json").write_text(json.dumps({"waits": waits, "returned": returned}))


def wait_share(path: Path) -> dict[str, float]:
    """Share of the steady steps (all but the first, which waits for the pipeline to start) spent in
    ``next(batches)``: their waits over the time from the first batch's return to the last's."""
    t = json.loads(path.read_text())
    span = t["returned"][-1] - t["returned"][0]
    loop_s = t["returned"][-1] - (t["returned"][0] - t["waits"][0])  # from the first next() on
    return {"share": sum(t["waits"][1:]) / span, "step_s": span / (len(t["returned"]) - 1),
            "first_batch_s": t["waits"][0], "max_wait_s": max(t["waits"][1:]), "run_share": sum(t["waits"]) / loop_s}


def train_run(data: Any, spec: TrainSpec, out: Path) -> dict[str, Any]:
    from jobs.trainer import build_trainer

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trainer = build_trainer(spec, data, out, train_loop=functools.partial(timed_loop, out=str(out)))
    started = time.perf_counter()
    with PeakMemory() as mem:
        trainer.fit()
    ranks = [wait_share(p) for p in sorted(out.glob("data-wait-rank*.json"))]
    return {"seconds": time.perf_counter() - started, "steps": spec.train.steps, "memory": mem.result(),
            "ranks": ranks, "wait_share": max(r["share"] for r in ranks)}


# -- preparation --------------------------------------------------------------------------------


def _cpu_s(procs: list[Any]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except Exception:  # noqa: BLE001 (psutil.Error: a worker that just exited)
            continue
        out[p.pid] = t.user + t.system
    return out


def prepare_run(scratch: Path, tokenizer: str, input_bytes: int = PREP_INPUT_BYTES) -> dict[str, Any]:
    """``jobs.prepare``'s pipeline on a standard-library slice: wall time of the whole preparation and
    of the shard phase (the runner's part, after the tokenizer exists), and the CPU seconds the shard
    tasks' processes used (a per-core figure that other users' load on the machine does not move)."""
    from workers.corpus import PrepareConfig, prepare, ray_runner

    out = scratch / f"prepare-{tokenizer}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(path=str(out), max_bytes=input_bytes, tokenizer=tokenizer, vocab_size=BPE_VOCAB,
                        bpe_sample_bytes=input_bytes, shard_bytes=PREP_SHARD_BYTES)
    tasks = ray_runner(max_tasks=PREP_TASKS)
    raylet = PeakMemory().raylet
    phase: dict[str, float] = {}

    def timed_tasks(shards: list[Any], **kw: Any) -> Iterator[Any]:
        cpu0, t0 = _cpu_s(raylet.children()), time.perf_counter()
        yield from tasks(shards, **kw)
        phase["seconds"] = time.perf_counter() - t0
        cpu1 = _cpu_s(raylet.children())
        phase["cpu_s"] = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
        phase["shards"] = len(shards)

    started = time.perf_counter()
    manifest = prepare(cfg, log=lambda msg: None, runner=timed_tasks)
    total_s = time.perf_counter() - started
    in_mb = manifest.input_bytes / MB
    tokens = sum(s.tokens - s.documents for s in manifest.splits.values())  # EOS excluded
    cores = min(PREP_TASKS, phase["shards"])
    return {"tokenizer": tokenizer, "input_mb": in_mb, "total_s": total_s, "shard_s": phase["seconds"],
            "cores": cores, "mb_per_s_per_core": in_mb / phase["seconds"] / cores,
            "end_to_end_mb_per_s": in_mb / total_s, "mb_per_cpu_s": in_mb / phase["cpu_s"],
            "tokens_per_byte": tokens / manifest.input_bytes}


# -- the section --------------------------------------------------------------------------------


def _cached(path: Path, reuse: bool, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if reuse and path.exists():
        print(f"bench: data: reusing {path}", flush=True)
        return json.loads(path.read_text())
    print(f"bench: data: {path.stem} ...", flush=True)
    result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def _measure_set(scratch: Path, gb: float, spec: TrainSpec, with_arrow: bool) -> dict[str, Any]:
    """Generate a set, verify it as a run does, pass over it (Ray Data; pyarrow too if asked), train on it."""
    from workers.data import open_training_data

    root = scratch / f"shards-{gb:g}gb"
    made = make_shards(root, gb * GB, scratch / "pool")
    pa.default_memory_pool().release_unused()  # the drawing's buffers are not the passes' memory
    started = time.perf_counter()
    data = open_training_data(spec.data, spec.model.vocab_size, log=lambda msg: None)
    result = {"size_gb": gb, **made, "verify_s": time.perf_counter() - started, "ray": ray_pass(data, spec)}
    if with_arrow:
        result["arrow"] = arrow_pass(data, spec)
        rows = SHARD_TOKENS // (spec.data.seq_len + 1)
        result["ordering"] = {"rows": rows, "rows_per_s": {str(n): ordering_cost(rows, spec.data.seq_len, n)
                                                           for n in (1, 8)}}
    result["train"] = train_run(data, spec, scratch / f"train-{gb:g}gb")
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _goal(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _markdown(sizes: tuple[float, float], sets: dict[str, dict], prep: dict[str, dict], steps: int) -> list[str]:
    small, large = sets["small"], sets["large"]
    default = sizes == SIZES_GB
    md = ["## Data plane: memory as the data grows, Ray Data vs pyarrow, data wait, preparation", "",
          f"`python -m tests.bench --sections data` (tests/bench/data.py): shards of random byte ids in the "
          f"prepared format, {small['size_gb']:g} GB ({small['shards']} shards) vs {large['size_gb']:g} GB "
          f"({large['shards']} shards) of files, {SHARD_TOKENS // 2**20} Mi tokens per shard; the demo spec "
          f"(2 CPU workers, global batch {small['ray']['batch_rows']} x {small['ray']['seq_len']} + 1 tokens). "
          + ("The issue asks for 1 vs 8 GB: on this shared 2-core machine (load average 40-200 from other "
             "users while this was written) the trainer's input path moves ~30k rows/s (~4M tokens/s), so one "
             "pass over 8 GB would take over half an hour, past the ~20 minutes this section may take; these "
             f"sizes keep the 8x ratio (`{SIZES_ENV}=1,8` runs the original)."
             if default else f"Sizes set by `{SIZES_ENV}`."), "",
          "Memory: peaks sampled every 0.2 s of the summed RSS of the driver and every Ray worker process (the "
          "raylet's children), the same without shared pages (each reader's mapped object-store pages count in "
          "its RSS), and the object store's used bytes.", "",
          "| pass | set | GiB RSS | GiB RSS without shared | GiB object store | seconds |", "|---|---|---:|---:|---:|---:|"]
    for kind, label in (("ray", "data only, whole set"), ("train", f"training, {steps} steps")):
        for s in (small, large):
            p = s[kind]["memory"]["peak"]
            md.append(f"| {label} | {s['size_gb']:g} GB | {_gib(p['rss_bytes'])} | {_gib(p['private_bytes'])} | "
                      f"{_gib(p['store_bytes'])} | {s[kind]['seconds']:.0f} |")
        ratio = {k: large[kind]["memory"]["peak"][k] / max(small[kind]["memory"]["peak"][k], 1)
                 for k in ("rss_bytes", "private_bytes", "store_bytes")}
        md.append(f"| {label}: large / small (goal <= {GOALS['memory_ratio']}) | | **{ratio['rss_bytes']:.2f}** "
                  f"({_goal(ratio['rss_bytes'] <= GOALS['memory_ratio'])}) | {ratio['private_bytes']:.2f} | "
                  f"{ratio['store_bytes']:.2f} | |")
    ray_small, arrow = small["ray"], small["arrow"]
    md += ["", "Rows/s of global batches into the trainer (packed rows put in the loop's training order, cut "
               "into global batches, int64 tensors), Ray Data's path vs pyarrow reading the same files one after "
               "the other in the driver; steady = after the first batch; reader s = time spent getting blocks:", "",
           "| read | set | rows/s | / pyarrow (goal >= 0.7) | steady rows/s | first batch s | reader s | total s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, s, r in (("pyarrow, one file after the other", small, arrow),
                        ("Ray Data, the trainer's iterator", small, ray_small),
                        ("Ray Data, the trainer's iterator", large, large["ray"])):
        ratio = r["rows_per_s"] / arrow["rows_per_s"]
        shown = f"**{ratio:.2f}** ({_goal(ratio >= GOALS['ray_vs_arrow'])})" if r is ray_small else f"{ratio:.2f}"
        md.append(f"| {label} | {s['size_gb']:g} GB | {r['rows_per_s']:,.0f} | {shown} | "
                  f"{r['steady_rows_per_s']:,.0f} | {r['first_batch_s']:.1f} | {r['reader_s']:.0f} | "
                  f"{r['seconds']:.0f} |")
    order = small["ordering"]
    md += ["", f"The loop's ordering alone (`workers.order.ordered_rows` + `global_batches`, no reader) over one "
               f"shard's {order['rows']:,} packed rows: {order['rows_per_s']['1']:,.0f} rows/s handed over as one "
               f"block (what a shard read whole gives), {order['rows_per_s']['8']:,.0f} rows/s as 8 blocks "
               "(a window or batch copies only its own rows: the cost is linear in the block size; before "
               "workers/order.py each cut copied the rest of its block, 41,596 vs 370,911 rows/s). Whole-pass "
               "rows/s include the wait for the first batch (Ray Data starting its pipeline), which dominates "
               "a pass over the small set; steady rows/s compare the reading itself.", "",
           "Data wait: time in the loop's `next(batches)` over the time between steps, steps 2.. of the run; "
           "whole run = all waits, the first (the pipeline starting) included, over the loop's time; worst rank:",
           "", "| training run | s per step | data wait share (goal <= 5%) | whole run | longest wait s | "
               "first batch s |", "|---|---:|---:|---:|---:|---:|"]
    for s in (small, large):
        worst = max(s["train"]["ranks"], key=lambda r: r["share"])
        md.append(f"| {s['size_gb']:g} GB, {steps} steps | {worst['step_s']:.2f} | **{worst['share']:.1%}** "
                  f"({_goal(worst['share'] <= GOALS['wait_share'])}) | {worst['run_share']:.0%} | "
                  f"{worst['max_wait_s']:.3f} | {worst['first_batch_s']:.0f} |")
    md += ["", f"Checking a set's SHA-256s before a run (`open_training_data`): {small['verify_s']:.0f} s for "
               f"{small['size_gb']:g} GB, {large['verify_s']:.0f} s for {large['size_gb']:g} GB.", "",
           f"Preparation (`prepare` with `ray_runner`, {PREP_TASKS} tasks at once) of {PREP_INPUT_BYTES / MB:.0f} MB "
           f"of the standard library; per core = input MB / shard-phase s / tasks; per CPU-s = input MB / CPU "
           f"seconds of the task processes (other users' load does not move it); end to end includes planning and "
           f"BPE training on the slice ({BPE_VOCAB} ids):", "",
           "| tokenizer | MB/s per core | MB per CPU-s | end-to-end MB/s | tokens per byte |", "|---|---:|---:|---:|---:|"]
    md += [f"| {t} | {p['mb_per_s_per_core']:.2f} | {p['mb_per_cpu_s']:.2f} | {p['end_to_end_mb_per_s']:.2f} | "
           f"{p['tokens_per_byte']:.3f} |" for t, p in prep.items()]
    return md


def data_section(scratch: Path, steps: int | None = None, reuse: bool = False) -> dict:
    from jobs.trainer import init_ray
    from workers.data import open_training_data

    steps = steps or TRAIN_STEPS
    scratch = scratch.resolve() / "data"  # Ray Train's storage_path must be absolute
    results = scratch / "results"
    sizes = sizes_gb()
    base = [*SETS, f"train.steps={steps}"]
    init_ray(load_spec(DEMO, base), verbose=False)
    prepare_run(scratch, "bytes", PREP_WARMUP_BYTES)  # starts the task processes the measured runs reuse
    prep = {tok: _cached(results / f"prepare-{tok}.json", reuse, lambda tok=tok: prepare_run(scratch, tok))
            for tok in ("bytes", "bpe")}
    if not (reuse and all((results / f"set-{gb:g}gb.json").exists() for gb in sizes)):
        warmup = scratch / "shards-warmup"  # an unmeasured pass first: Ray Data's read processes start here
        make_shards(warmup, 1, scratch / "pool")
        spec = load_spec(DEMO, [*base, f"data.path={warmup}"])
        ray_pass(open_training_data(spec.data, spec.model.vocab_size, log=lambda msg: None), spec)
    sets = {}
    for label, gb in zip(("small", "large"), sizes, strict=True):
        spec = load_spec(DEMO, [*base, f"data.path={scratch / f'shards-{gb:g}gb'}"])
        sets[label] = _cached(results / f"set-{gb:g}gb.json", reuse,
                              lambda gb=gb, spec=spec, label=label: _measure_set(scratch, gb, spec, label == "small"))
    for folder in scratch.iterdir():  # the shards (GBs of them) and the runs' outputs; results/ stays
        if folder.name != "results":
            shutil.rmtree(folder)
    return {"data": {"name": "data", "sizes_gb": list(sizes), "sets": sets, "prepare": prep, "goals": GOALS},
            "markdown": _markdown(sizes, sets, prep, steps)}
