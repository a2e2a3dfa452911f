"""MoE vs dense at equal active parameters, and bias vs auxiliary-loss load balancing.

One process, torch on 1 thread (as each of the demo's 2 workers on a 2-core machine), the demo model
(``jobs/examples/demo.yaml``: d_model 128, 4 layers, 4 heads, 8 routed experts of width 128, top-2,
1 shared expert, capacity factor 1.25, seq 128, batch 16, AdamW lr 3e-3, warm-up 20 + cosine). Three
variants train in lock step on the SAME deterministic batches from the standard-library shards, one
optimizer step of each per batch, in a rotating order, so the step times of the variants are taken
side by side under the same load (this machine is shared and noisy; ratios hold, absolute times move):

- ``moe-bias``: the demo model (auxiliary-loss-free balancing by a per-expert bias, DeepSeek-V3,
  selecting on batch-centred router logits: ``router_centering``);
- ``moe-aux``: the same with ``balance="aux"`` (Switch/GShard auxiliary loss, default coefficient)
  and the classic router (no centering);
- ``dense``: every block's MoE replaced by one SwiGLU FFN of width top_k * F + n_shared * F = 384,
  the MoE's active FFN width per token (see ``DENSE_NOTE`` for why not a ``ModelConfig``).

Goals (from the issue): MoE tokens/s >= 0.7x dense with lower eval loss at equal tokens; MaxVio with
bias balancing <= 0.1 and >= 5x lower than with the auxiliary loss; dropped fraction at capacity
factor 1.25 with bias balancing <= 1%.

The tables are written by tests/bench/moe_report.py.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from workers.compression import CompressionConfig
from workers.config import LoopConfig
from workers.data import DataConfig, build_shards, shard_paths
from workers.data.reader import pack_sequences
from workers.moe.model import INIT_STD, FeedForward, ModelConfig, MoETransformer
from workers.moe.stats import max_vio
from workers.step import TrainStep, build_optimizer, evaluate, final_window

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "runs" / "bench" / "moe_vs_dense_data"
# ~6 MB of the standard library: ~5.8M train tokens (300 steps use 0.6M, no sequence repeats) and
# enough held-out files for the eval set.
MAX_BYTES = 6_000_000
SEED = 0
THREADS = 1
BATCH = 16
EVAL_BATCHES = 32  # held-out batches of BATCH sequences (eval mode: no capacity dropping)
TIMING_SKIP = 10  # first steps left out of the throughput windows (allocator, first-call overheads)
TIMING_WINDOW = 10  # steps per throughput window; the ratio is the median over windows
BALANCE_TAIL = 0.2  # MaxVio and drops are averaged over this last share of the steps
FWD_BWD_REPS = 7  # forward + backward only, side by side, after training
PROGRESS_EVERY = 50
GOAL_SPEED = 0.7
GOAL_MAXVIO = 0.1
GOAL_MAXVIO_RATIO = 5.0
GOAL_DROP = 0.01
# MaxVio of loads summed over windows of this many consecutive tail steps (a batch w times larger)
WINDOWS = (1, 2, 4, 8, 16)
FLOOR_REPS = 400  # draws of the independent-routing floor (see max_vio_floor)

DEMO = ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=128, n_routed_experts=8, n_shared_experts=1,
                   expert_hidden=128, top_k=2, balance="bias", capacity_factor=1.25)
LOOP = LoopConfig(steps=300, batch_size=BATCH, lr=3e-3, warmup_steps=20)
DENSE_WIDTH = DEMO.top_k * DEMO.expert_hidden + DEMO.n_shared_experts * DEMO.expert_hidden
# The same active width through ModelConfig: one routed expert always chosen (top-1 of 1) + 2 shared.
DENSE_AS_CONFIG = DEMO.model_copy(update={"n_routed_experts": 1, "top_k": 1, "balance": "none",
                                          "n_shared_experts": DENSE_WIDTH // DEMO.expert_hidden - 1})
DENSE_NOTE = (
    "`ModelConfig` cannot express a router-free FFN (`n_routed_experts >= 1`). "
    f"`ModelConfig(n_routed_experts=1, top_k=1, n_shared_experts={DENSE_AS_CONFIG.n_shared_experts}, "
    f"expert_hidden={DEMO.expert_hidden})` has the same active width ({DENSE_WIDTH}) but still runs the router, "
    "the sort by expert, the gather and the scatter-add on every token (and its router learns nothing: a "
    "top-1-of-1 gate is always 1), which would flatter the MoE's speed ratio. The dense baseline therefore "
    f"replaces each block's MoE by a plain SwiGLU `FeedForward({DEMO.d_model}, {DENSE_WIDTH})` (one fused "
    "matmul per projection), initialised like the model's own FFNs; the ModelConfig form is timed beside it "
    "(forward + backward only) for reference."
)


def _say(line: str) -> None:
    print(f"bench moe: {line}", flush=True)


# ----------------------------------------------------------------------------------------------
# Models


class DenseFFN(FeedForward):
    """A SwiGLU FFN in the MoE's slot: no routing; exposes the MoE's bookkeeping as empty."""

    last_counts = None
    last_aux_loss = None


def dense_model(cfg: ModelConfig, width: int) -> MoETransformer:
    """The transformer of ``cfg`` with every block's MoE replaced by ``DenseFFN(d_model, width)``."""
    model = MoETransformer(cfg.model_copy(update={"balance": "none"}))
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    for block in model.layers:
        ffn = DenseFFN(cfg.d_model, width)
        nn.init.normal_(ffn.w1.weight, std=INIT_STD)
        nn.init.normal_(ffn.w3.weight, std=INIT_STD)
        nn.init.normal_(ffn.w2.weight, std=out_std)
        block.moe = ffn
    return model


def param_counts(model: MoETransformer) -> dict[str, int]:
    """Total trainable parameters and those active per token (tied embedding counted once)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    inactive = 0
    if not isinstance(model.layers[0].moe, DenseFFN):
        per_expert = 3 * cfg.d_model * cfg.expert_hidden
        inactive = cfg.n_layers * (cfg.n_routed_experts - cfg.top_k) * per_expert
    return {"total": total, "active": total - inactive}


# ----------------------------------------------------------------------------------------------
# Data


def load_batches(steps: int, data_dir: Path = DATA_DIR) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``steps`` training batches (BATCH, L + 1) and up to EVAL_BATCHES held-out ones, deterministic."""
    manifest = build_shards(DataConfig(path=str(data_dir), max_bytes=MAX_BYTES, seq_len=DEMO.max_seq_len),
                            log=_say)

    def rows(split: str) -> np.ndarray:
        paths = shard_paths(manifest, split)
        if not paths:
            raise SystemExit(f"bench moe: no {split} shards in {data_dir}")
        table = pq.read_table(paths, columns=["tokens"])
        return pack_sequences(table, DEMO.max_seq_len)  # (R, L + 1) uint16

    train = rows("train")
    train = train[np.random.default_rng(SEED).permutation(len(train))]  # (R, L + 1)
    need = steps * BATCH
    if need > len(train):
        _say(f"{need} sequences needed, {len(train)} packed: the data repeats")
        train = np.concatenate([train] * math.ceil(need / len(train)))
    train_b = [torch.from_numpy(train[i * BATCH:(i + 1) * BATCH].astype(np.int64)) for i in range(steps)]
    val = rows("val")
    n_eval = min(EVAL_BATCHES, len(val) // BATCH)
    if n_eval == 0:
        raise SystemExit(f"bench moe: fewer than {BATCH} held-out sequences; raise MAX_BYTES")
    val_b = [torch.from_numpy(val[i * BATCH:(i + 1) * BATCH].astype(np.int64)) for i in range(n_eval)]
    return train_b, val_b


# ----------------------------------------------------------------------------------------------
# Training


def max_vio_floor(tokens: int, n_experts: int, top_k: int, reps: int = FLOOR_REPS) -> float:
    """Mean MaxVio of a batch of ``tokens`` whose tokens each pick top_k distinct experts uniformly at
    random and independently: the per-batch floor of any per-token router with perfectly balanced
    expected loads (what is left is sampling noise, ~sqrt(mean load) per expert)."""
    rng = np.random.default_rng(SEED)
    vio = []
    for _ in range(reps):
        picks = rng.random((tokens, n_experts)).argsort(axis=1)[:, :top_k]  # (T, K) distinct, uniform
        load = np.bincount(picks.ravel(), minlength=n_experts)  # (E,)
        vio.append(load.max() / load.mean() - 1.0)
    return float(np.mean(vio))


def windowed_max_vio(counts: np.ndarray, window: int) -> float:
    """Mean over layers and over consecutive windows of ``window`` steps of the MaxVio of the loads
    summed in each window, from per-step counts (S, N, 2E + 2)."""
    whole = counts.shape[0] // window * window
    summed = counts[counts.shape[0] - whole:].reshape(-1, window, *counts.shape[1:]).sum(axis=1)  # (S/w, N, .)
    return float(max_vio(summed).mean())


def routing_summary(counts: np.ndarray, held_out: np.ndarray, tail: int) -> dict[str, Any]:
    """From per-step router counts (S, N, 2E + 2) and held-out counts (N, 2E + 2)."""
    steps = counts.shape[0]
    vio = max_vio(counts)  # (S, N) per step and layer
    dropped, assigned = counts[..., -2], counts[..., -1]  # (S, N)
    fifths = []
    for i in range(5):
        lo, hi = i * steps // 5, (i + 1) * steps // 5
        if hi > lo:
            fifths.append({"steps": [lo, hi], "max_vio": float(vio[lo:hi].mean()),
                           "drop_frac": float(dropped[lo:hi].sum() / assigned[lo:hi].sum())})
    return {
        "balance_window": tail,
        "max_vio_tail": vio[-tail:].mean(axis=0).tolist(),  # (N,) per-step MaxVio, averaged
        # MaxVio of the loads summed over the tail steps (what a progress line over a window reports)
        "max_vio_tail_summed": max_vio(counts[-tail:].sum(axis=0)).tolist(),  # (N,)
        # mean over layers, loads summed over windows of w tail steps: MaxVio at w times the batch
        "max_vio_by_window": {w: windowed_max_vio(counts[-tail:], w) for w in WINDOWS},
        "max_vio_held_out": max_vio(held_out).tolist(),  # (N,) over the whole eval set, final biases
        "drop_frac_all": (dropped.sum(0) / assigned.sum(0)).tolist(),  # (N,)
        "drop_frac_all_pooled": float(dropped.sum() / assigned.sum()),
        "drop_frac_tail": (dropped[-tail:].sum(0) / assigned[-tail:].sum(0)).tolist(),  # (N,)
        "drop_frac_tail_pooled": float(dropped[-tail:].sum() / assigned[-tail:].sum()),
        "fifths": fifths,  # mean over layers, by fifth of the run
    }


def train_side_by_side(models: dict[str, MoETransformer], batches: list[torch.Tensor],
                       val: list[torch.Tensor], loop: LoopConfig) -> dict[str, dict[str, Any]]:
    """Trains every model on the same batches, one step each per batch in a rotating order.

    The product's step (workers/step.py, one process, no DDP): lr schedule, forward, LM loss + aux
    loss, backward, global-norm clip, AdamW step, router-bias update from this step's counts.
    Timed per model per step.
    """
    names = list(models)
    comp = CompressionConfig(method="none")
    steps_of = {n: TrainStep(model=m, forward=m, optimizer=build_optimizer(m, loop, comp), loop=loop, compression=comp)
                for n, m in models.items()}
    rec: dict[str, dict[str, list]] = {n: {"time": [], "loss": [], "counts": []}
                                       for n in names}
    started = time.perf_counter()
    for step, x in enumerate(batches):  # (B, L + 1)
        for j in range(len(names)):
            name = names[(step + j) % len(names)]
            t0 = time.perf_counter()
            result = steps_of[name](step, x)
            rec[name]["time"].append(time.perf_counter() - t0)
            rec[name]["loss"].append(result.loss.item())
            if not isinstance(models[name].layers[0].moe, DenseFFN):
                rec[name]["counts"].append(result.counts.numpy().copy())  # (N, 2E + 2)
        done = step + 1
        if done % PROGRESS_EVERY == 0 or done == len(batches):
            parts = []
            for n in names:
                r = rec[n]
                part = (f"{n} loss {statistics.fmean(r['loss'][-PROGRESS_EVERY:]):.3f} "
                        f"{1e3 * statistics.median(r['time'][-PROGRESS_EVERY:]):.0f} ms/step")
                if r["counts"]:
                    recent = np.stack(r["counts"][-PROGRESS_EVERY:])  # (S, N, 2E + 2)
                    part += (f" MaxVio {max_vio(recent).mean(axis=0).max():.2f} dropped "
                             f"{100 * recent[..., -2].sum() / recent[..., -1].sum():.1f}%")
                parts.append(part)
            _say(f"step {done}/{len(batches)} ({time.perf_counter() - started:.0f} s): " + "; ".join(parts))

    out = {}
    steps = len(batches)
    tail = final_window(steps)
    bal = max(1, round(BALANCE_TAIL * steps))
    for n in names:
        r = rec[n]
        held_out = evaluate(models[n], val, len(val))
        res: dict[str, Any] = {
            "final_loss": statistics.fmean(r["loss"][-tail:]), "final_loss_window": tail, "eval_loss": held_out.loss,
            "step_times": r["time"], "loss_curve": [round(v, 4) for v in r["loss"]],
        }
        if r["counts"]:
            res |= routing_summary(np.stack(r["counts"]), held_out.counts.numpy(), bal)
        out[n] = res
    return out


def speed_ratio(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """Median over windows of sum(den) / sum(num): tokens/s of `num`'s model over `den`'s (equal tokens)."""
    ratios = [sum(den[i:i + TIMING_WINDOW]) / sum(num[i:i + TIMING_WINDOW])
              for i in range(TIMING_SKIP, len(num) - TIMING_WINDOW + 1, TIMING_WINDOW)]
    if not ratios:  # very short runs
        ratios = [sum(den) / sum(num)]
    return statistics.median(ratios), ratios


def fwd_bwd_times(models: dict[str, MoETransformer], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median forward + backward time of each model on one batch, taken alternately."""
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for rep in range(reps + 1):
        for j in range(len(names)):
            name = names[(rep + j) % len(names)]
            model = models[name]
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            logits = model(x[:, :-1])  # (B, L, V)
            (F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + model.aux_loss()).backward()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


# ----------------------------------------------------------------------------------------------
# Section


def moe_section(steps: int = 300) -> dict:
    from tests.bench.moe_report import markdown

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    try:
        loop = LOOP.model_copy(update={"steps": steps})
        batches, val = load_batches(steps)
        tokens_per_step = BATCH * DEMO.max_seq_len
        _say(f"{steps} steps x {tokens_per_step} tokens, {len(val)} held-out batches; variants train side by side")
        models: dict[str, MoETransformer] = {}
        torch.manual_seed(SEED)
        models["moe-bias"] = MoETransformer(DEMO)
        torch.manual_seed(SEED)
        models["moe-aux"] = MoETransformer(DEMO.model_copy(update={"balance": "aux", "router_centering": False}))
        torch.manual_seed(SEED)
        models["dense"] = dense_model(DEMO, DENSE_WIDTH)
        params = {n: param_counts(m) for n, m in models.items()}
        runs = train_side_by_side(models, batches, val, loop)

        ratio, windows = speed_ratio(runs["moe-bias"]["step_times"], runs["dense"]["step_times"])
        med = {n: statistics.median(r["step_times"][TIMING_SKIP:] or r["step_times"]) for n, r in runs.items()}
        _say("forward + backward only, side by side (with the ModelConfig form of the dense model)")
        torch.manual_seed(SEED)
        models["dense-as-config"] = MoETransformer(DENSE_AS_CONFIG)
        params["dense-as-config"] = param_counts(models["dense-as-config"])
        fb = fwd_bwd_times({n: models[n] for n in ("moe-bias", "dense", "dense-as-config")}, batches[0], FWD_BWD_REPS)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started

    bias, aux, dense = runs["moe-bias"], runs["moe-aux"], runs["dense"]
    speed_ok = ratio >= GOAL_SPEED
    loss_ok = bias["eval_loss"] < dense["eval_loss"]
    vio_rows = []
    for layer, (vb, va) in enumerate(zip(bias["max_vio_tail"], aux["max_vio_tail"], strict=True)):
        vio_rows.append({"layer": layer, "bias": vb, "aux": va, "aux_over_bias": va / vb if vb > 0 else math.inf,
                         "ok": vb <= GOAL_MAXVIO and va >= GOAL_MAXVIO_RATIO * vb})
    vio_ok = all(r["ok"] for r in vio_rows)
    drop_ok = bias["drop_frac_all_pooled"] <= GOAL_DROP
    floors = {w: max_vio_floor(tokens_per_step * w, DEMO.n_routed_experts, DEMO.top_k) for w in WINDOWS}

    data = {
        "name": "moe_vs_dense", "steps": steps, "threads": THREADS, "batch": BATCH, "seq_len": DEMO.max_seq_len,
        "model": DEMO.model_dump(), "dense_width": DENSE_WIDTH, "params": params,
        "speed_ratio": ratio, "speed_windows": windows, "median_step_s": med, "fwd_bwd_s": fb,
        "runs": {n: {k: v for k, v in r.items() if k != "step_times"} for n, r in runs.items()},
        "max_vio": vio_rows, "max_vio_floor": floors,
        "goals": {"speed": {"goal": GOAL_SPEED, "ok": speed_ok}, "eval_loss": {"ok": loss_ok},
                  "max_vio": {"goal": GOAL_MAXVIO, "ratio": GOAL_MAXVIO_RATIO, "ok": vio_ok},
                  "drop": {"goal": GOAL_DROP, "ok": drop_ok}},
        "wall_s": wall,
    }
    return {"data": data, "markdown": markdown(data, loop, len(val))}


if __name__ == "__main__":
    import sys

    section = moe_section(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
    print("\n".join(section["markdown"]))
