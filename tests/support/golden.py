"""Golden loss curves: a small fixed run of the real model and the real compression hook.

Two gloo processes train the MoE with the product's training step (``workers.step``: DDP, the
compression hook, expert parallelism, the optimizer and the router-bias update, as a Ray job runs
them) on fixed, generated batches (no Ray, no streaming order), so a fresh run reproduces the checked-in curve up to float noise; a change that silently
hurts convergence (of the model, the router, the hook or error feedback) moves it. Regenerate
after an intended change with ``python -m tests.support.golden --update`` and say why in the commit.

Why float64 and pinned kernels: the run is chaotic. In float32, a last-bit difference between two
CPUs' math kernels (MKL's AVX-512 path on AMD vs Intel, say) flips a near-tie in the router's or the
compressor's top-k within a few steps, and the curves then part by up to 0.1 (measured: 0.059 for
dense between an AMD EPYC and the machine that wrote the curves; 0.11 for top-k without error
feedback between ATen's AVX-512 and its scalar kernels on one machine). In float64 the same
perturbations are ~1e-9 times smaller and no tie flips: ATen's AVX-512, AVX2 and scalar kernels,
each with MKL's own or its conditional-numerical-reproducibility path, give curves equal to 5
decimals on one machine. The kernels are pinned as well (``NUMERICS_ENV``), so a CPU that picks yet
another path in some library still runs the same code.

``MUTATIONS`` are deliberate small regressions (error feedback off, half the density, twice the
learning rate, a frozen router bias): each must move its base curve by far more than the tolerance,
which shows the tolerance is tight enough to catch them.

A new curve is added without touching the others: ``python -m tests.support.golden --add NAME ...`` runs only
the named variants and writes their curves beside the checked-in ones, which stay byte-identical.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.support.distributed import run_scenarios, scenario_values
from workers.compression import CompressionConfig
from workers.config import LoopConfig, ModelConfig
from workers.step import build_step

CURVES = Path(__file__).with_name("golden_curves.json")
WORLD = 2
STEPS = 40
SEQ, BATCH = 32, 8
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ, n_routed_experts=4, top_k=2,
                    n_shared_experts=1, expert_hidden=32)
LOOP = LoopConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup_steps=5)
TOPK = CompressionConfig(method="topk", density=0.05, error_feedback=True, selection="exact")
# The demo's own compression (jobs/examples/demo.yaml) at this model's density: Adam-preconditioned
# top-k with local clipping, the optimizer plain SGD.
DEMO_TOPK = TOPK.model_copy(update={"precondition": "adam", "clip_norm": 1.0})
# Local steps with the chunk-wise top-k + error-feedback outer sync (workers/compression/local.py):
# 10 rounds of 4 steps after a 2-step dense warm-up, 5% of each chunk at 2-bit values.
LOCAL = CompressionConfig(method="local", local_steps=4, density=0.05, value_bits=2, error_decay=0.95,
                          warmup_steps=2)
# name -> the changes to build_step's arguments from (MODEL, dense, LOOP, EP 1)
VARIANTS: dict[str, dict] = {
    "dense": {"comp": CompressionConfig(method="none")},
    "topk_5pct_ef": {"comp": TOPK},
    "topk_5pct_no_ef": {"comp": TOPK.model_copy(update={"error_feedback": False})},
    "demo_adam": {"comp": DEMO_TOPK},
    "demo_adam_ep2": {"comp": DEMO_TOPK, "expert_parallel": 2},
    "local_h4_5pct_2bit": {"comp": LOCAL},
    "local_h4_5pct_2bit_ep2": {"comp": LOCAL, "expert_parallel": 2},
}
# name -> (the variant whose golden curve it is compared with, what changes)
MUTATIONS: dict[str, tuple[str, dict]] = {
    "ef_off": ("topk_5pct_ef", VARIANTS["topk_5pct_no_ef"]),
    "half_density": ("topk_5pct_ef", {"comp": TOPK.model_copy(update={"density": TOPK.density / 2})}),
    "double_lr": ("dense", {"loop": LOOP.model_copy(update={"lr": 2 * LOOP.lr})}),
    "frozen_router_bias": ("dense", {"model": MODEL.model_copy(update={"bias_update_rate": 0.0})}),
    "local_ef_off": ("local_h4_5pct_2bit", {"comp": LOCAL.model_copy(update={"error_feedback": False})}),
    "local_twice_the_steps": ("local_h4_5pct_2bit", {"comp": LOCAL.model_copy(update={"local_steps": 8})}),
}
# Set in every rank before torch starts: MKL's conditional numerical reproducibility (the same code
# path on any x86 CPU, Intel or AMD) and ATen's scalar kernels (no AVX-512 vs AVX2 choice).
NUMERICS_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}
DTYPE = torch.float64
COLLECTIVE_TIMEOUT_S = 120
JOIN_TIMEOUT_S = 600
# Comma-separated names: the ranks run only these (``--add``); unset, every variant and mutation.
ONLY_ENV = "GOLDEN_ONLY"


def corpus(seed: int = 0, n_lines: int = 4000) -> bytes:
    """Code-like text with learnable structure, generated (identical on every machine)."""
    rng = random.Random(seed)
    names = ["x", "y", "total", "count", "value", "item", "result", "index"]
    lines = []
    for i in range(n_lines):
        a, b = rng.choice(names), rng.choice(names)
        lines.append(rng.choice([f"def f{i % 97}({a}, {b}):", f"    return {a} + {b} * {i % 13}",
                                 f"    {a} = {b}[{i % 7}]", f"for {a} in range({i % 50}):", f"    if {a} > {b}:"]))
    return ("\n".join(lines) + "\n").encode()


def batches(rank: int) -> torch.Tensor:
    data = torch.tensor(list(corpus()), dtype=torch.long)  # (tokens,)
    rows = data[: len(data) // (SEQ + 1) * (SEQ + 1)].view(-1, SEQ + 1)  # (rows, SEQ + 1)
    g = torch.Generator().manual_seed(1234)
    order = torch.randperm(len(rows), generator=g)
    per_step = rows[order[: STEPS * WORLD * BATCH]].view(STEPS, WORLD, BATCH, SEQ + 1)
    return per_step[:, rank]  # (STEPS, BATCH, SEQ + 1)


def _train(rank: int, change: dict) -> list[float]:
    """One rank of the golden run (inside tests.support.distributed's process group): the loss curve of the
    product's training step (workers/step.py)."""
    torch.set_default_dtype(DTYPE)
    args = {"model": MODEL, "comp": CompressionConfig(method="none"), "loop": LOOP} | change
    step = build_step(args.pop("model"), args.pop("comp"), args.pop("loop"), **args)
    curve = []
    for i, x in enumerate(batches(rank)):  # (BATCH, SEQ + 1)
        mean = step(i, x).loss.clone()
        dist.all_reduce(mean)
        curve.append(round(mean.item() / WORLD, 5))
    return curve


ALL = {name: functools.partial(_train, change=change) for name, change in VARIANTS.items()} | {
    name: functools.partial(_train, change=VARIANTS[base] | change) for name, (base, change) in MUTATIONS.items()}
_ONLY = [name for name in os.environ.get(ONLY_ENV, "").split(",") if name]
SCENARIOS = {name: ALL[name] for name in _ONLY} if _ONLY else ALL


def run_curves(names: list[str] | None = None) -> dict[str, list[float]]:
    """Every variant's and mutation's curve (or only ``names``'), from one spawn of WORLD gloo ranks."""
    unknown = sorted(set(names or ()) - set(ALL))
    if unknown:
        raise ValueError(f"unknown golden runs {unknown}; known: {sorted(ALL)}")
    env = NUMERICS_ENV | ({ONLY_ENV: ",".join(names)} if names else {})
    with tempfile.TemporaryDirectory() as tmp:
        results = run_scenarios(__name__, Path(tmp), WORLD, COLLECTIVE_TIMEOUT_S, JOIN_TIMEOUT_S, env)
    return {name: scenario_values(results, name)[0] for name in names or ALL}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.support.golden")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--update", action="store_true", help=f"rewrite every curve of {CURVES.name}")
    what.add_argument("--add", nargs="+", metavar="NAME", choices=sorted(VARIANTS),
                      help=f"run only these variants and write their curves into {CURVES.name}, the others kept as they are")
    args = p.parse_args()
    curves = run_curves(args.add)
    for name, curve in curves.items():
        print(f"{name}: {curve[0]:.3f} -> {curve[-1]:.3f}")
    if args.update or args.add:
        golden = json.loads(CURVES.read_text())["curves"] if args.add else {}
        golden.update({name: curves[name] for name in VARIANTS if name in curves})
        CURVES.write_text(json.dumps({"steps": STEPS, "dtype": str(DTYPE), "curves": golden}, indent=1) + "\n")
        print(f"wrote {CURVES}")


if __name__ == "__main__":
    main()
