"""The data section's preparation figures: ``jobs.prepare``'s pipeline (``prepare`` with
``ray_runner``) on a slice of the standard library, with the bytes and the BPE tokenizer."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench.data import MB, PeakMemory

PREP_INPUT_BYTES = 16_000_000  # the standard-library slice prepared with each tokenizer
PREP_SHARD_BYTES = 2_000_000  # small shards, so every task slot has several
PREP_WARMUP_BYTES = 4_000_000  # an unmeasured first preparation: Ray starts its task processes
PREP_TASKS = os.cpu_count() or 1
BPE_VOCAB = 8192


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
    from workers.data import PrepareConfig, prepare, ray_runner

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
