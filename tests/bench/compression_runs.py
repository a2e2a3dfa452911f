"""Dense vs top-k (error feedback on and off) on the demo spec, at equal steps."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import DEMO, run_train

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


def compression_section(scratch: Path, steps: int | None, only: list[str] | None = None, reuse: bool = False) -> dict:
    rows = []
    for label, sets in VARIANTS:
        if only and label != "dense" and label not in only:
            continue
        out = scratch / label.replace(" ", "_").replace("%", "pct").replace(",", "").replace("+", "")
        extra = sets + ([f"train.steps={steps}"] if steps else [])
        args = ["--spec", str(DEMO), "--out", str(out), "--no-sample"] + [a for s in extra for a in ("--set", s)]
        if reuse and (out / "summary.json").exists():
            print(f"bench: {label}: reusing {out / 'summary.json'}", flush=True)
        else:
            print(f"bench: {label} ...", flush=True)
            r = run_train(*args, timeout=3600)
            if r.returncode != 0:
                raise SystemExit(f"bench run {label!r} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        s = json.loads((out / "summary.json").read_text())
        rows.append({"variant": label, **{k: s[k] for k in ("final_loss", "eval_loss", "steps", "tokens_per_s",
                                                              "wire_bytes", "dense_bytes", "compression")}})
    dense = rows[0]
    for row in rows:
        row["loss_gap_pct"] = 100 * (row["final_loss"] / dense["final_loss"] - 1)
        row["eval_gap_pct"] = 100 * (row["eval_loss"] / dense["eval_loss"] - 1)
        row["throughput_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
    md = ["## Compressed vs dense gradient sync (demo spec, 2 CPU workers, gloo)", "",
          f"`make bench` (or `python -m tests.bench`): `jobs/examples/demo.yaml`, {dense['steps']} steps each, same "
          "seed and data. final loss = mean training loss over the last 10% of steps; eval loss on held-out files.", "",
          "| variant | final loss | gap vs dense | eval loss | gap vs dense | bytes sent | dense / sent | tokens/s vs dense |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['final_loss']:.4f} | {r['loss_gap_pct']:+.2f}% | {r['eval_loss']:.4f} | "
                  f"{r['eval_gap_pct']:+.2f}% | {r['wire_bytes'] / 1e6:.1f} MB | {r['compression']:.1f}x | "
                  f"{r['throughput_vs_dense']:.2f} |")
    return {"data": {"name": "compression", "rows": rows}, "markdown": md}
