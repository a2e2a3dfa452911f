"""The bytes-vs-loss frontier of method local (local steps + chunk-wise top-k/EF outer sync) on the
demo model: eval gap vs dense AdamW (DDP) and dense / sent bytes, at equal steps.

Two gloo ranks (tests/distributed.py) run the product's training step (workers/step.py) on the
demo spec's model and schedule, on byte windows of this Python's standard library source (held-out
files by a hash of the path, as the demo's data), without Ray, so a setting costs one short run.
Dense is DDP + AdamW with the global clip (the compression bench's "dense" row).

    python -m tests.bench.local_sgd [--steps 300] [--variants dense,H8_1pct_2bit,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from jobs.specs import load_spec
from tests.conftest import DEMO
from tests.distributed import run_scenarios, scenario_values
from workers.config import CompressionConfig
from workers.step import build_step, evaluate

WORLD = 2
EVAL_BATCHES = 16
VAL_PERCENT = 2  # held-out share of files, by CRC-32 of the relative path
VARIANTS_ENV, STEPS_ENV = "LOCAL_SGD_BENCH_VARIANTS", "LOCAL_SGD_BENCH_STEPS"


def _local(h: int, density: float, bits: int, decay: float = 0.95, warmup: int = 0) -> CompressionConfig:
    return CompressionConfig(method="local", local_steps=h, density=density, value_bits=bits, error_decay=decay,
                             warmup_steps=warmup)


# name -> compression config (None: dense DDP)
VARIANTS: dict[str, CompressionConfig] = {
    "dense": CompressionConfig(method="none"),
    "H1_1pct_8bit": _local(1, 0.01, 8),
    "H8_dense_avg": CompressionConfig(method="local", local_steps=8, density=1.0, value_bits=32, error_decay=0.0),
    "H8_3pct_8bit": _local(8, 0.03, 8),
    "H8_1pct_8bit": _local(8, 0.01, 8),
    "H8_1pct_2bit": _local(8, 0.01, 2),
    "H16_1pct_2bit": _local(16, 0.01, 2),
}


def _corpus(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint8 token arrays: this Python's stdlib .py files, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(root.rglob("*.py"))[:3000]:
        rel = str(path.relative_to(root))
        if "site-packages" in rel:
            continue
        data = path.read_bytes() + b"\0"
        (val if zlib.crc32(rel.encode()) % 100 < VAL_PERCENT else train).append(data)
    return (np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8))


def _windows(tokens: np.ndarray, n: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    starts = gen.integers(0, len(tokens) - seq_len - 1, n)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def _run(rank: int, name: str) -> dict:
    spec = load_spec(DEMO)
    steps = int(os.environ[STEPS_ENV])
    comp = VARIANTS[name]
    loop = spec.train.model_copy(update={"steps": steps, "grad_clip": 1.0})
    train, val = _corpus(spec.data.seq_len)
    step = build_step(spec.model, comp, loop, seed=spec.seed)
    start = time.perf_counter()
    for i in range(steps):
        step(i, _windows(train, loop.batch_size, spec.data.seq_len, seed=10_000 * i + rank))
    step.finish_round()
    seconds = time.perf_counter() - start
    batches = [_windows(val, loop.batch_size, spec.data.seq_len, seed=777_000 + 100 * b + rank)
               for b in range(EVAL_BATCHES)]
    wire, dense = step.byte_counts()
    return {"eval": evaluate(step.model, batches, EVAL_BATCHES).loss, "wire": wire, "dense": dense,
            "seconds": seconds}


def _scenario(name: str):
    return lambda rank: _run(rank, name)


SCENARIOS = {name: _scenario(name) for name in os.environ.get(VARIANTS_ENV, "").split(",") if name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = run_scenarios(__name__, Path(tmp), WORLD, collective_timeout_s=600, join_timeout_s=7200,
                                env={VARIANTS_ENV: ",".join(names), STEPS_ENV: str(args.steps), "OMP_NUM_THREADS": "1"})
    rows = {}
    for name in names:
        values = scenario_values(results, name)
        rows[name] = {"eval": values[0]["eval"], "wire": sum(v["wire"] for v in values),
                      "dense": sum(v["dense"] for v in values), "seconds": max(v["seconds"] for v in values)}
    base = rows.get("dense", {}).get("eval")
    print(f"| variant ({args.steps} steps) | eval loss | vs dense | dense / sent | seconds |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        gap = f"{100 * (r['eval'] / base - 1):+.1f}%" if base else "n/a"
        ratio = r["dense"] / r["wire"] if r["wire"] else float("nan")
        print(f"| {name} | {r['eval']:.4f} | {gap} | {ratio:.0f}x | {r['seconds']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
