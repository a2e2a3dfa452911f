"""Dense vs top-k (error feedback on and off) on the demo spec, at equal steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from jobs.specs.train import load_spec
from tests.conftest import DEMO, run_train
from workers.moe.model import MoETransformer
from workers.progress import parse_progress

# The demo spec compresses Adam-preconditioned directions; the other variants go back to AdamW
# on the synced gradient with its global clip.
ADAMW = ["compression.precondition=none", "compression.clip_norm=null", "train.grad_clip=1.0"]
VARIANTS = [
    ("dense", ["compression.method=none", *ADAMW]),
    ("topk 1% + EF, Adam-preconditioned", ["compression.density=0.01"]),
    ("topk 1% + EF into AdamW", ["compression.density=0.01", *ADAMW]),
    ("topk 1%, no EF", ["compression.density=0.01", "compression.error_feedback=false", *ADAMW]),
    ("topk 0.1% + EF, Adam-preconditioned", ["compression.density=0.001"]),
    ("topk 0.1%, no EF", ["compression.density=0.001", "compression.error_feedback=false", *ADAMW]),
    ("PowerSGD rank 1", ["compression.method=powersgd", "compression.powersgd_rank=1", *ADAMW]),
    ("PowerSGD rank 2", ["compression.method=powersgd", "compression.powersgd_rank=2", *ADAMW]),
    ("PowerSGD rank 4", ["compression.method=powersgd", "compression.powersgd_rank=4", *ADAMW]),
]


HORIZON_VARIANTS = ["dense", "topk 0.1% + EF, Adam-preconditioned"]
HORIZON_STEPS = 900


def updated_share(run_dir: Path, sets: list[str]) -> float:
    """Share of the model's parameters that any synced update ever moved, from the final checkpoint.

    The model is rebuilt at its initial values (the spec's seed, as the training loop does). An entry
    no update ever reached has only been decayed: it equals its initial value (no-decay tensors), or
    its initial value times the decay factor the whole tensor shares (found as the median ratio; at
    least half the entries are untouched wherever this matters). Anything else counts as updated.
    """
    spec = load_spec(DEMO, sets)
    torch.manual_seed(spec.seed)
    initial = MoETransformer(spec.model)
    final_dir = max((run_dir / "ray-train").glob("step-*"))
    final = torch.load(final_dir / "model.pt", map_location="cpu", weights_only=True)
    updated = total = 0
    for name, p in initial.named_parameters():
        p0, p1 = p.detach().float(), final[name].float()
        if p.dim() >= 2:  # decayed by (1 - lr * wd) each step, like every entry of its tensor
            decay = (p1 / p0)[p0.abs() > 1e-3].median()
            moved = (p1 - p0 * decay).abs() > 1e-4 * p0.abs() + 1e-7
        else:
            moved = p1 != p0
        updated += int(moved.sum())
        total += p0.numel()
    return updated / total


def _run(scratch: Path, label: str, steps: int | None, reuse: bool) -> dict:
    """One demo-spec training run of VARIANTS[label] (train.steps overridden when given): its summary."""
    sets = dict(VARIANTS)[label] + ([f"train.steps={steps}"] if steps else [])
    name = label.replace(" ", "_").replace("%", "pct").replace(",", "").replace("+", "")
    out = scratch / (name + (f"_{steps}" if steps else ""))
    args = ["--spec", str(DEMO), "--out", str(out), "--no-sample"] + [a for s in sets for a in ("--set", s)]
    if reuse and (out / "summary.json").exists():
        print(f"bench: {label}: reusing {out / 'summary.json'}", flush=True)
    else:
        print(f"bench: {label}{f' ({steps} steps)' if steps else ''} ...", flush=True)
        r = run_train(*args, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"bench run {label!r} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        curve = {}  # step -> mean training loss over the steps since the previous progress line
        for line in r.stdout.splitlines():
            m = parse_progress(line)
            if m and "loss" in m and "step" in m:
                curve[m["step"]] = m["loss"]
        (out / "loss_curve.json").write_text(json.dumps(sorted(curve.items())))
    s = json.loads((out / "summary.json").read_text())
    row = {"variant": label, **{k: s[k] for k in ("final_loss", "eval_loss", "steps", "tokens_per_s",
                                                   "wire_bytes", "dense_bytes", "compression")}}
    row["loss_curve"] = json.loads((out / "loss_curve.json").read_text())  # [[step, loss], ...]
    row["updated_share"] = updated_share(out, sets)
    row["ran_at"] = time.strftime("%Y-%m-%d %H:%M", time.localtime((out / "summary.json").stat().st_mtime))
    return row


def _gaps(rows: list[dict]) -> None:
    dense = rows[0]
    for row in rows:
        row["loss_gap_pct"] = 100 * (row["final_loss"] / dense["final_loss"] - 1)
        row["eval_gap_pct"] = 100 * (row["eval_loss"] / dense["eval_loss"] - 1)
        row["throughput_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]


def compression_section(scratch: Path, steps: int | None, only: list[str] | None = None, reuse: bool = False) -> dict:
    rows = [_run(scratch, label, steps, reuse) for label, _ in VARIANTS
            if not only or label == "dense" or label in only]
    _gaps(rows)
    dense = rows[0]
    md = ["## Compressed vs dense gradient sync (demo spec, 2 CPU workers, gloo)", "",
          f"`make bench` (or `python -m tests.bench`): `jobs/examples/demo.yaml`, {dense['steps']} steps each, same "
          "seed and data. final loss = mean training loss over the last 10% of steps; eval loss on held-out files; "
          "params updated = share of the model's parameters that any synced update ever moved (final checkpoint "
          "against the initial model; the rest have only been decayed); finished = when the run ended (`--reuse` "
          "keeps finished runs).", "",
          "| variant | final loss | gap vs dense | eval loss | gap vs dense | bytes sent | dense / sent | "
          "tokens/s vs dense | params updated | finished |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['final_loss']:.4f} | {r['loss_gap_pct']:+.2f}% | {r['eval_loss']:.4f} | "
                  f"{r['eval_gap_pct']:+.2f}% | {r['wire_bytes'] / 1e6:.1f} MB | {r['compression']:.1f}x | "
                  f"{r['throughput_vs_dense']:.2f} | {100 * r['updated_share']:.1f}% | {r['ran_at']} |")
    for r in rows:
        r.pop("loss_curve")
    return {"data": {"name": "compression", "rows": rows}, "markdown": md}


def horizon_section(scratch: Path, steps: int | None, reuse: bool = False) -> dict:
    """The 0.1% gap to dense at a longer horizon (the learning-rate schedule stretched to it)."""
    steps = steps or HORIZON_STEPS
    rows = [_run(scratch, label, steps, reuse) for label in HORIZON_VARIANTS]
    _gaps(rows)
    dense, topk = rows
    md = [f"## Top-k 0.1% vs dense at {steps} steps (demo spec, 2 CPU workers)", "",
          f"`python -m tests.bench --sections horizon` ({steps} steps; `--steps N` for another horizon): the two "
          "runs of the compression section, with `train.steps` (and so the cosine schedule) stretched. Training "
          "loss gap by stretch of the run (mean over each tenth of the steps), then final and eval loss.", "",
          "| steps | dense loss | top-k 0.1% loss | gap |", "|---|---|---|---|"]
    curves = [dict(r["loss_curve"]) for r in rows]  # step -> window loss
    logged = sorted(set(curves[0]) & set(curves[1]))
    for i in range(10):
        lo, hi = i * steps // 10, (i + 1) * steps // 10
        at = [s for s in logged if lo < s <= hi]
        if at:
            d, t = (sum(c[s] for s in at) / len(at) for c in curves)
            md.append(f"| {lo + 1}-{hi} | {d:.4f} | {t:.4f} | {100 * (t / d - 1):+.2f}% |")
    md += ["", "| variant | final loss | gap vs dense | eval loss | gap vs dense | dense / sent | params updated |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['final_loss']:.4f} | {r['loss_gap_pct']:+.2f}% | {r['eval_loss']:.4f} | "
                  f"{r['eval_gap_pct']:+.2f}% | {r['compression']:.1f}x | {100 * r['updated_share']:.1f}% |")
    return {"data": {"name": "horizon", "rows": rows}, "markdown": md}
