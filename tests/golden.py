"""Golden loss curves: a small fixed run of the real model and the real compression hook.

Two gloo processes train the MoE under DDP on fixed, generated batches (no Ray, no streaming
order), so a fresh run reproduces the checked-in curve up to float noise; a change that silently
hurts convergence (of the model, the router, the hook or error feedback) moves it. Regenerate
after an intended change with ``python -m tests.golden --update`` and say why in the commit.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from tests.distributed import run_scenarios, scenario_values
from workers import compression
from workers.compression import CompressionConfig
from workers.moe.model import ModelConfig, MoETransformer

CURVES = Path(__file__).with_name("golden_curves.json")
WORLD = 2
STEPS = 40
SEQ, BATCH = 32, 8
MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ, n_routed_experts=4, top_k=2,
                    n_shared_experts=1, expert_hidden=32)
VARIANTS = {
    "dense": CompressionConfig(method="none"),
    "topk_5pct_ef": CompressionConfig(method="topk", density=0.05, error_feedback=True, selection="exact"),
    "topk_5pct_no_ef": CompressionConfig(method="topk", density=0.05, error_feedback=False, selection="exact"),
}
LR = 1e-2
COLLECTIVE_TIMEOUT_S = 120
JOIN_TIMEOUT_S = 600


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


def _train(name: str, rank: int) -> list[float]:
    """One rank of the golden run (inside tests.distributed's process group): the loss curve."""
    torch.manual_seed(0)
    model = MoETransformer(MODEL)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    compression.register(ddp, VARIANTS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95))
    curve = []
    for x in batches(rank):  # (BATCH, SEQ + 1)
        logits = ddp(x[:, :-1])  # (BATCH, SEQ, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + model.aux_loss()).backward()
        opt.step()
        counts = model.router_counts()  # (layers, 2 * experts + 2)
        dist.all_reduce(counts)
        model.update_router_bias(counts)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        curve.append(round(mean.item() / WORLD, 5))
    return curve


SCENARIOS = {name: functools.partial(_train, name) for name in VARIANTS}


def run_curves() -> dict[str, list[float]]:
    """Every variant's curve, from one spawn of WORLD gloo ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        results = run_scenarios(__name__, Path(tmp), WORLD, COLLECTIVE_TIMEOUT_S, JOIN_TIMEOUT_S)
    return {name: scenario_values(results, name)[0] for name in VARIANTS}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.golden")
    p.add_argument("--update", action="store_true", help=f"rewrite {CURVES.name}")
    args = p.parse_args()
    curves = run_curves()
    for name, curve in curves.items():
        print(f"{name}: {curve[0]:.3f} -> {curve[-1]:.3f}")
    if args.update:
        CURVES.write_text(json.dumps({"steps": STEPS, "curves": curves}, indent=1) + "\n")
        print(f"wrote {CURVES}")


if __name__ == "__main__":
    main()
