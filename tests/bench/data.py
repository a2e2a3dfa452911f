"""The data plane (issue #15): memory as the dataset grows, Ray Data vs a raw pyarrow read, the
trainer's wait for data, and preparation throughput, side by side in one run.

Shards are generated straight in the prepared format (workers/data/shards.py ``write_shard``: row
groups of 4 MiB with their checksums, ``Manifest``), so a run reads and verifies them as it would a
``jobs.prepare`` output: documents of random byte ids (1..255, EOS 0; the bytes tokenizer),
``SHARD_TOKENS`` tokens per shard, the size of ``jobs.prepare``'s default shard. Random ids do not
compress, so a shard holds about one token per byte on disk (two in memory, uint16): "GB" here are
gigabytes of shard files. ``DISTINCT_SHARDS`` shards are drawn and the rest of a set are copies of
them (separate files, so separate reads and page-cache pages): readers do not care what the ids
are, and drawing and encoding every shard would take most of the section's time on 2 cores.

Measured, for a small and an 8x larger set (``SIZES_GB``, overridden by ``MOE_BENCH_DATA_GB``):
- a data-only pass over one epoch through a worker's own input path (workers/data/stream.py: the
  epoch's order, one Ray Data execution over the rank's row groups, int64 tensors) in the driver, one rank taking
  the whole global batch, and a fixed-step training run
  (``build_trainer(...).fit()`` on the demo spec); during each, a thread samples the summed RSS of
  the driver and every Ray worker process (the raylet's children) and the object store's used bytes.
- rows/s of global batches through that path vs the same consumer fed by ``pyarrow.parquet``
  reading the same files one after the other in this process (no Ray), side by side in alternating
  rounds (tests/bench/data_passes.py ``speed_pass``).
- the same data-only pass through ``ray.data.read_parquet``, the input path before the manifest-
  planned sources (workers/data/reader.py), side by side.
- the share of a training step spent waiting for data: a per-worker function wraps the
  product loop's data position (``workers.loop._Position.next``, in the worker process only; the loop
  does not know) and times each call against the time between steps.
- reading each sequence once, resuming, a read task's memory: tests/bench/data_exact.py.
- S3 reads of the same shards through pyarrow's client and through s3fs: tests/bench/data_s3.py.
- ``jobs.prepare``'s pipeline on a slice of the standard library with the bytes and the BPE
  tokenizer (tests/bench/data_prepare.py): input MB/s per core, and BPE tokens per input byte.

The passes are in tests/bench/data_passes.py; the tables are written by tests/bench/data_report.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.specs.train import load_spec
from tests.conftest import DEMO

SIZES_ENV = "MOE_BENCH_DATA_GB"  # "SMALL,LARGE" in GB of shard files, e.g. "0.125,1" on a slow machine
SIZES_GB = (1.0, 8.0)
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


def random_docs(rng: np.random.Generator, n_tokens: int) -> list[np.ndarray]:
    """Documents of random byte ids, ``n_tokens`` in all, each ending with EOS."""
    tokens = rng.integers(*BYTE_IDS, n_tokens, dtype=np.uint16)  # (tokens,)
    ends = np.cumsum(rng.integers(*DOC_TOKENS, n_tokens // DOC_TOKENS[0]))
    ends = np.append(ends[ends < n_tokens], n_tokens)  # (docs,) end offset of each document
    tokens[ends - 1] = 0  # EOS ends every document
    return np.split(tokens, ends[:-1])


def _random_shard(rng: np.random.Generator) -> tuple[bytes, int, int, list[dict[str, Any]]]:
    """One shard file's bytes in the prepared format (jobs.prepare's row groups), its rows, tokens and
    row-group entries."""
    from tests.bench.data_exact import ROW_GROUP_BYTES
    from workers.data.shards import write_shard

    docs = random_docs(rng, SHARD_TOKENS)
    raw, groups = write_shard([f"doc-{i}" for i in range(len(docs))], docs, ROW_GROUP_BYTES)
    return raw, len(docs), SHARD_TOKENS, [g.model_dump() for g in groups]


def make_shards(root: Path, size_bytes: float, pool: Path) -> dict[str, Any]:
    """A prepared dataset of at least ``size_bytes`` of shard files under ``root`` (module docstring);
    ``pool`` holds the distinct shards, drawn once and shared by every size."""
    from workers.data.manifest import (
        FileEntry,
        Manifest,
        ShardEntry,
        SplitEntry,
        TokenizerEntry,
        write_manifest,
    )
    from workers.data.storage import open_fs
    from workers.data.tokenizer import ByteTokenizer

    pool.mkdir(parents=True, exist_ok=True)
    meta_path = pool / "pool.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else []
    meta = [m for m in meta if "row_groups" in m]  # a pool drawn before row groups: drawn again
    rng = np.random.default_rng(len(meta))
    while len(meta) < DISTINCT_SHARDS:
        raw, rows, tokens, groups = _random_shard(rng)
        name = f"pool-{len(meta):02d}.parquet"
        (pool / name).write_bytes(raw)
        meta.append({"name": name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "rows": rows,
                     "tokens": tokens, "row_groups": groups})
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
                                  skipped_binary=0, row_groups=src["row_groups"]))
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


def _measure_sets(scratch: Path, sizes: tuple[float, float], base: list[str], reuse: bool) -> dict[str, dict]:
    """Both sets generated and verified as a run does, then each pass over both sets, one kind of
    pass after the other: a pass leaves the cluster larger than it found it (the driver's own reads,
    Ray Train's actors), so the two sizes of one pass start from the same state."""
    from tests.bench.data_exact import exact_section
    from tests.bench.data_passes import ray_pass, read_parquet_pass, speed_pass, train_run
    from workers.data import open_training_data

    results = scratch / "results"
    labels = dict(zip(("small", "large"), sizes, strict=True))
    specs = {label: load_spec(DEMO, [*base, f"data.path={scratch / f'shards-{gb:g}gb'}"]) for label, gb in labels.items()}
    passes = {"ray": ray_pass, "read_parquet": read_parquet_pass, "speed": speed_pass,
              "exact": lambda data, spec: exact_section(data, spec, scratch),
              "train": lambda data, spec: train_run(data, spec, scratch / f"train-{Path(spec.data.path).name}")}
    wanted = [(kind, label) for kind in passes for label in labels if label == "small" or kind not in ("speed", "exact")]
    files = {(kind, label): results / f"{kind}-{labels[label]:g}gb.json" for kind, label in wanted}
    sets_file = results / "sets.json"
    data: dict[str, Any] = {}
    if reuse and sets_file.exists() and all(f.exists() for f in files.values()):
        sets = json.loads(sets_file.read_text())
    else:
        warmup = scratch / "shards-warmup"  # an unmeasured pass first: Ray Data's read processes start here
        make_shards(warmup, 1, scratch / "pool")
        spec = load_spec(DEMO, [*base, f"data.path={warmup}"])
        ray_pass(open_training_data(spec.data, spec.model.vocab_size, log=lambda msg: None), spec)
        sets = {}
        for label, gb in labels.items():
            made = make_shards(scratch / f"shards-{gb:g}gb", gb * GB, scratch / "pool")
            pa.default_memory_pool().release_unused()  # the drawing's buffers are not the passes' memory
            started = time.perf_counter()
            data[label] = open_training_data(specs[label].data, specs[label].model.vocab_size, log=lambda msg: None)
            sets[label] = {"size_gb": gb, **made,
                           "verify_s": time.perf_counter() - started}
        os.sync()  # GBs of new files: their write-back would compete with the first passes
        results.mkdir(parents=True, exist_ok=True)
        sets_file.write_text(json.dumps(sets, indent=1))
    for kind, label in wanted:
        sets[label][kind] = _cached(files[kind, label], reuse,
                                    lambda run=passes[kind], label=label: run(data[label], specs[label]))
    return sets


def data_section(scratch: Path, steps: int | None = None, reuse: bool = False) -> dict:
    from jobs.runtime.trainer import init_ray
    from tests.bench.data_prepare import PREP_WARMUP_BYTES, prepare_run
    from tests.bench.data_report import markdown
    from tests.bench.data_s3 import s3_section

    steps = steps or TRAIN_STEPS
    scratch = scratch.resolve() / "data"  # Ray Train's storage_path must be absolute
    results = scratch / "results"
    sizes = sizes_gb()
    base = [*SETS, f"train.steps={steps}"]
    init_ray(load_spec(DEMO, base), verbose=False)
    prepare_run(scratch, "bytes", PREP_WARMUP_BYTES)  # starts the task processes the measured runs reuse
    prep = {tok: _cached(results / f"prepare-{tok}.json", reuse, lambda tok=tok: prepare_run(scratch, tok))
            for tok in ("bytes", "bpe")}
    sets = _measure_sets(scratch, sizes, base, reuse)
    s3 = _cached(results / "s3.json", reuse, s3_section)
    for folder in scratch.iterdir():  # the shards (GBs of them) and the runs' outputs; results/ stays
        if folder.name != "results":
            shutil.rmtree(folder)
    return {"data": {"name": "data", "sizes_gb": list(sizes), "sets": sets, "prepare": prep, "s3": s3,
                     "goals": GOALS},
            "markdown": markdown(sets, prep, steps, s3)}
