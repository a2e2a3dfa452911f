"""The MoE vs dense section's tables (tests/bench/moe_vs_dense.py measures; this writes BENCHMARKS.md's part)."""

from __future__ import annotations

import statistics
from typing import Any

from tests.bench.moe_vs_dense import (
    BALANCE_TAIL,
    BATCH,
    DEMO,
    DENSE_NOTE,
    FLOOR_REPS,
    FWD_BWD_REPS,
    GOAL_DROP,
    GOAL_MAXVIO,
    GOAL_MAXVIO_RATIO,
    GOAL_SPEED,
    MAX_BYTES,
    SEED,
    THREADS,
    TIMING_WINDOW,
    WINDOWS,
)
from workers.config import LoopConfig


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def markdown(data: dict[str, Any], loop: LoopConfig, n_eval: int) -> list[str]:
    """The section's markdown from its ``data`` (``moe_section``), the run's loop and its number of
    held-out batches."""
    steps, params, runs = data["steps"], data["params"], data["runs"]
    med, fb, floors, vio_rows = data["median_step_s"], data["fwd_bwd_s"], data["max_vio_floor"], data["max_vio"]
    ratio, windows, wall = data["speed_ratio"], data["speed_windows"], data["wall_s"]
    goals = data["goals"]
    speed_ok, loss_ok, vio_ok, drop_ok = (goals[k]["ok"] for k in ("speed", "eval_loss", "max_vio", "drop"))
    bias, aux, dense = runs["moe-bias"], runs["moe-aux"], runs["dense"]
    mean_b, mean_a = statistics.fmean(bias["max_vio_tail"]), statistics.fmean(aux["max_vio_tail"])
    tokens_per_step = BATCH * DEMO.max_seq_len
    tokens = steps * tokens_per_step
    assignments = tokens_per_step * DEMO.top_k

    md = ["## MoE vs dense, and bias vs auxiliary-loss balancing (demo model, 1 process)", "",
          f"`tests/bench/moe_vs_dense.py`: the demo model ({DEMO.n_layers} layers, d_model {DEMO.d_model}, "
          f"{DEMO.n_routed_experts} routed experts of width {DEMO.expert_hidden}, top-{DEMO.top_k}, "
          f"{DEMO.n_shared_experts} shared, capacity factor {DEMO.capacity_factor}), {steps} steps of "
          f"{BATCH} x {DEMO.max_seq_len} tokens ({tokens / 1e6:.2f}M tokens; one worker's batch, the demo's "
          f"2 workers see 2x), AdamW lr {loop.lr:g}, warm-up {loop.warmup_steps} + cosine, clip {loop.grad_clip}, "
          f"torch on {THREADS} thread. All variants train in lock step on the same batches (standard-library "
          f"shards, {MAX_BYTES / 1e6:.0f} MB, shuffled with seed {SEED}) from the same seed, one step each per batch "
          "in a rotating order. Eval loss: "
          f"{n_eval} x {BATCH} held-out sequences (files of the `val` split), eval mode (no capacity dropping). "
          f"Final loss: mean LM loss of the last {bias['final_loss_window']} steps.", "",
          f"Dense baseline: {DENSE_NOTE}", "",
          "| model | total params | active params / token | median step | tokens/s | final loss | eval loss |",
          "|---|---|---|---|---|---|---|"]
    for n in ("moe-bias", "dense", "moe-aux"):
        md.append(f"| {n} | {params[n]['total'] / 1e6:.3f}M | {params[n]['active'] / 1e6:.3f}M | "
                  f"{med[n] * 1e3:.0f} ms | {tokens_per_step / med[n]:.0f} | {runs[n]['final_loss']:.4f} | "
                  f"{runs[n]['eval_loss']:.4f} |")
    md += ["", "| goal | measured | ✓/✗ |", "|---|---|---|",
           f"| MoE tokens/s >= {GOAL_SPEED}x dense (training step, median of {len(windows)} windows of "
           f"{TIMING_WINDOW} interleaved steps) | {ratio:.2f}x (windows {min(windows):.2f}-{max(windows):.2f}) | "
           f"{_mark(speed_ok)} |",
           f"| MoE eval loss < dense at equal tokens | {bias['eval_loss']:.4f} vs {dense['eval_loss']:.4f} "
           f"({100 * (bias['eval_loss'] / dense['eval_loss'] - 1):+.2f}%) | {_mark(loss_ok)} |",
           f"| MaxVio with bias <= {GOAL_MAXVIO} and >= {GOAL_MAXVIO_RATIO:g}x lower than aux, every layer "
           f"(below) | mean over layers {mean_b:.3f} vs {mean_a:.3f} ({mean_a / mean_b:.1f}x) | {_mark(vio_ok)} |",
           f"| dropped assignments at capacity factor {DEMO.capacity_factor} with bias <= {GOAL_DROP:.0%} "
           f"(whole run) | {100 * bias['drop_frac_all_pooled']:.2f}% (last {bias['balance_window']} steps "
           f"{100 * bias['drop_frac_tail_pooled']:.2f}%) | {_mark(drop_ok)} |",
           "",
           f"Forward + backward only, one batch, median of {FWD_BWD_REPS} alternating runs: moe-bias "
           f"{fb['moe-bias'] * 1e3:.0f} ms, dense {fb['dense'] * 1e3:.0f} ms (ratio {fb['dense'] / fb['moe-bias']:.2f}x), "
           f"dense as `ModelConfig` ({params['dense-as-config']['total'] / 1e6:.3f}M params) "
           f"{fb['dense-as-config'] * 1e3:.0f} ms (MoE at {fb['dense-as-config'] / fb['moe-bias']:.2f}x of it).", "",
           f"Load balance: MaxVio = max load / mean load - 1 per layer and step (loads of this step's "
           f"{tokens_per_step * DEMO.top_k} assignments, {BATCH} sequences), averaged over the last "
           f"{bias['balance_window']} steps ({BALANCE_TAIL:.0%}) -- the goal's measure; beside it, for reference, the "
           "MaxVio of the loads summed over those steps, and over the whole held-out set with the final biases "
           f"(eval mode). Bias rate {DEMO.bias_update_rate:g} with router centering, aux coefficient "
           f"{DEMO.aux_loss_coef:g} with the classic uncentred router (the defaults otherwise). "
           f"Final LM loss: bias {bias['final_loss']:.4f}, aux {aux['final_loss']:.4f}; eval: bias "
           f"{bias['eval_loss']:.4f}, aux {aux['eval_loss']:.4f}. Dropped = assignments (token, expert) over "
           "capacity, whole run; a token loses one of its top-2 experts, never the shared expert.", "",
           "| layer | MaxVio bias | MaxVio aux | aux / bias | ✓/✗ | summed: bias / aux | held-out: bias / aux | "
           "dropped: bias / aux |",
           "|---|---|---|---|---|---|---|---|"]
    for r in vio_rows:
        i = r["layer"]
        md.append(f"| {i} | {r['bias']:.3f} | {r['aux']:.3f} | {r['aux_over_bias']:.1f}x | {_mark(r['ok'])} | "
                  f"{bias['max_vio_tail_summed'][i]:.3f} / {aux['max_vio_tail_summed'][i]:.3f} | "
                  f"{bias['max_vio_held_out'][i]:.3f} / {aux['max_vio_held_out'][i]:.3f} | "
                  f"{100 * bias['drop_frac_all'][i]:.2f}% / {100 * aux['drop_frac_all'][i]:.2f}% |")
    md += ["", f"MaxVio by batch size: the loads of w consecutive steps of the last {bias['balance_window']} summed "
           f"(a batch w times larger), mean over windows and layers. Floor: the mean MaxVio of a batch whose "
           f"tokens each pick {DEMO.top_k} distinct experts uniformly and independently ({FLOOR_REPS} draws): "
           "sampling noise alone, the least any router that routes each token on its own can reach. At one "
           f"step ({assignments} assignments) the floor is {floors[1]:.3f}, so no per-token router can be "
           f"{GOAL_MAXVIO_RATIO:g}x below aux's {mean_a:.3f} there; the ratio grows with the batch.", "",
           "| w | assignments | MaxVio bias | MaxVio aux | aux / bias | floor |", "|---|---|---|---|---|---|"]
    for w in WINDOWS:
        vb, va = bias["max_vio_by_window"][w], aux["max_vio_by_window"][w]
        md.append(f"| {w} | {assignments * w} | {vb:.3f} | {va:.3f} | {va / vb:.1f}x | {floors[w]:.3f} |")
    md += ["", "Over the run (mean over layers of the per-step MaxVio; dropped share of all assignments):", "",
           "| steps | MaxVio bias | MaxVio aux | dropped bias | dropped aux |", "|---|---|---|---|---|"]
    for fb_, fa in zip(bias["fifths"], aux["fifths"], strict=True):
        md.append(f"| {fb_['steps'][0] + 1}-{fb_['steps'][1]} | {fb_['max_vio']:.3f} | {fa['max_vio']:.3f} | "
                  f"{100 * fb_['drop_frac']:.2f}% | {100 * fa['drop_frac']:.2f}% |")
    md += ["", f"Section wall time {wall:.0f} s."]
    return md
