"""One timed 2-rank run per compression variant of the demo model, with its eval curve: the runner of
the local-steps sections (tests/bench/local_sections.py) and a command of its own.

Two gloo ranks (tests/support/distributed.py: plain torch.distributed processes, one torch thread each) run
the product's training step (workers/step.py) on the demo spec's model and schedule, on byte
windows of this Python's standard library source (held-out files by a hash of the path), without
Ray. Every ``EVAL_EVERY`` steps the ranks evaluate the weights they agree on (method local: the last
synced start weights, so an eval never closes a round) on one fixed held-out set; the clock stops
meanwhile, so ``seconds`` is training time only (compute + sync). Inside a network namespace with a
shaped loopback (tests/bench/local_sections.py) the same command measures a slow link.

    python -m tests.bench.local_sgd [--steps 300] [--variants dense,local_h8_3pct,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from jobs.specs.train import load_spec
from tests.conftest import DEMO
from tests.support.distributed import run_scenarios, scenario_values
from workers.config import CompressionConfig
from workers.step import TrainStep, build_step, evaluate

WORLD = 2
EVAL_BATCHES = 8  # held-out batches per rank at every eval: 2 x 8 x 16 sequences of 128 tokens
EVAL_EVERY = 16  # steps; a multiple of every local_steps here, so the evals see whole rounds
VAL_PERCENT = 2  # held-out share of files, by CRC-32 of the relative path
VARIANTS_ENV, STEPS_ENV = "LOCAL_SGD_BENCH_VARIANTS", "LOCAL_SGD_BENCH_STEPS"


def _local(h: int, density: float, bits: int = 2, decay: float = 0.95, warmup: int = 0,
           outer_lr: float = 1.0) -> CompressionConfig:
    return CompressionConfig(method="local", local_steps=h, density=density, value_bits=bits, error_decay=decay,
                             warmup_steps=warmup, outer_lr=outer_lr)


# name -> (label, compression config). The demo's per-step top-k keeps its own optimizer contract
# (SGD on Adam directions, local clipping); every other variant is AdamW with the global clip 1.0.
VARIANTS: dict[str, tuple[str, CompressionConfig]] = {
    "dense": ("dense (DDP)", CompressionConfig(method="none")),
    "topk_1pct": ("per-step top-k 1% + EF, Adam-preconditioned (the demo's before local steps)",
                  CompressionConfig(method="topk", density=0.01, precondition="adam", clip_norm=1.0)),
    "diloco_h8": ("DiLoCo H 8, plain average (outer lr 1)",
                  CompressionConfig(method="local", local_steps=8, density=1.0, value_bits=32, error_decay=0.0)),
    "local_h4_3pct": ("local H 4, top-k 3%, 2-bit", _local(4, 0.03)),
    "local_h8_1pct": ("local H 8, top-k 1%, 2-bit", _local(8, 0.01)),
    "local_h4_3pct_olr15": ("local H 4, top-k 3%, 2-bit, outer lr 1.5", _local(4, 0.03, outer_lr=1.5)),
    "local_h8_3pct_olr15": ("local H 8, top-k 3%, 2-bit, outer lr 1.5", _local(8, 0.03, outer_lr=1.5)),
    "local_h16_3pct_olr2": ("local H 16, top-k 3%, 2-bit, outer lr 2", _local(16, 0.03, outer_lr=2.0)),
    "local_h4_6pct_olr15": ("local H 4, top-k 6%, 2-bit, outer lr 1.5", _local(4, 0.06, outer_lr=1.5)),
    "local_h4_3pct_4bit_olr15": ("local H 4, top-k 3%, 4-bit, outer lr 1.5", _local(4, 0.03, bits=4, outer_lr=1.5)),
    "local_h8_3pct_4bit_olr15": ("local H 8, top-k 3%, 4-bit, outer lr 1.5", _local(8, 0.03, bits=4, outer_lr=1.5)),
    "local_h4_3pct_8bit_olr15": ("local H 4, top-k 3%, 8-bit, outer lr 1.5", _local(4, 0.03, bits=8, outer_lr=1.5)),
    # Three trials of jobs/examples/sweep-local.yaml (12 trials, ASHA; BENCHMARKS.md "Local steps: the
    # sweep"), their settings rounded: the lowest training loss, the lowest at >= 100x, at >= 1000x.
    "sweep_loss": ("sweep's lowest loss: local H 4, top-k 10%, 4-bit, outer lr 1.73, decay 0.92, 48 dense steps",
                   _local(4, 0.1, bits=4, decay=0.92, warmup=48, outer_lr=1.73)),
    "sweep_100x": ("sweep's lowest loss at >= 100x: local H 8, top-k 10%, 4-bit, outer lr 1.18, decay 0.95",
                   _local(8, 0.1, bits=4, decay=0.95, outer_lr=1.18)),
    "sweep_1000x": ("sweep's lowest loss at >= 1000x: local H 16, top-k 3%, 4-bit, outer lr 1.02, decay 0.81",
                    _local(16, 0.03, bits=4, decay=0.81, outer_lr=1.02)),
}


def _corpus() -> tuple[np.ndarray, np.ndarray]:
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
    """(n, seq_len + 1) windows at random offsets, from ``seed``."""
    gen = np.random.default_rng(seed)
    starts = gen.integers(0, len(tokens) - seq_len - 1, n)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def _synced_model(step: TrainStep) -> torch.nn.Module:
    """The weights every rank agrees on now: the model (per-step methods), or for method local a copy
    holding the round's start weights (the open round is left as it is)."""
    if step.outer is None:
        return step.model
    model = copy.deepcopy(step.model)
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in step.outer.params.values()]
    with torch.no_grad():
        for name, part in zip(step.outer.params, step.outer.anchor.split(sizes), strict=True):
            params[name].copy_(part.view_as(params[name]))
    return model


def run_variant(rank: int, name: str, steps: int) -> dict:
    """One rank of one variant: {"curve": [[step, train seconds, eval loss], ...], "wire", "dense",
    "seconds", "tokens"} (bytes and tokens this rank's)."""
    spec = load_spec(DEMO)
    seq = spec.data.seq_len
    loop = spec.train.model_copy(update={"steps": steps, "grad_clip": 1.0})
    train, val = _corpus()
    step = build_step(spec.model, VARIANTS[name][1], loop, seed=spec.seed)
    held_out = [_windows(val, loop.batch_size, seq, seed=777_000 + 100 * b + rank) for b in range(EVAL_BATCHES)]
    curve, seconds = [], 0.0
    for i in range(steps):
        x = _windows(train, loop.batch_size, seq, seed=10_000 * i + rank)  # (batch, seq + 1)
        start = time.perf_counter()
        step(i, x)
        if i + 1 == steps:
            step.finish_round()
        seconds += time.perf_counter() - start
        if (i + 1) % EVAL_EVERY == 0 or i + 1 == steps:
            curve.append([i + 1, seconds, evaluate(_synced_model(step), held_out, EVAL_BATCHES).loss])
    wire, dense = step.byte_counts()
    return {"curve": curve, "wire": wire, "dense": dense, "seconds": seconds,
            "tokens": steps * loop.batch_size * seq}


SCENARIOS = {name: (lambda rank, name=name: run_variant(rank, name, int(os.environ[STEPS_ENV])))
             for name in os.environ.get(VARIANTS_ENV, "").split(",") if name}


def run(names: list[str], steps: int) -> dict[str, dict]:
    """Each variant on WORLD ranks, one after the other in one process group: name -> {"curve" (the
    slower rank's seconds), "eval" (final), "wire" / "dense" (summed over ranks), "seconds",
    "tokens_per_s"}."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = run_scenarios(__name__, Path(tmp), WORLD, collective_timeout_s=600, join_timeout_s=7200,
                                env={VARIANTS_ENV: ",".join(names), STEPS_ENV: str(steps), "OMP_NUM_THREADS": "1"})
    rows = {}
    for name in names:
        values = scenario_values(results, name)
        curve = [[s, max(v["curve"][j][1] for v in values), loss] for j, (s, _, loss) in enumerate(values[0]["curve"])]
        seconds = max(v["seconds"] for v in values)
        rows[name] = {"label": VARIANTS[name][0], "steps": steps, "curve": curve, "eval": curve[-1][2],
                      "wire": sum(v["wire"] for v in values), "dense": sum(v["dense"] for v in values),
                      "seconds": seconds, "tokens_per_s": sum(v["tokens"] for v in values) / seconds}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args()
    rows = run(args.variants.split(","), args.steps)
    base = rows.get("dense", {}).get("eval")
    print(f"| variant ({args.steps} steps) | eval loss | vs dense | dense / sent | seconds |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        gap = f"{100 * (r['eval'] / base - 1):+.1f}%" if base else "n/a"
        ratio = r["dense"] / r["wire"] if r["wire"] else float("nan")
        print(f"| {name} | {r['eval']:.4f} | {gap} | {ratio:.0f}x | {r['seconds']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
