"""The compression sweep run by the product: ``python -m jobs.sweep`` on jobs/examples/sweep-local.yaml
(12 trials of the demo model, 2 workers each, random search, ASHA), every trial with its training loss,
held-out loss and byte saving. ``python -m tests.bench --sections local-sweep`` runs it (about 25
minutes on 2 cores); ``python -m tests.bench.local_sweep --summary OUT/summary.json`` writes the
section from a run already made. Three of its trials run at 900 steps in the frontier (local_sgd.py's
``sweep_*`` variants)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "jobs" / "examples" / "sweep-local.yaml"
COLUMNS = [("compression.local_steps", "H"), ("compression.density", "density"), ("compression.value_bits", "bits"),
           ("compression.error_decay", "decay"), ("compression.outer_lr", "outer lr"),
           ("compression.warmup_steps", "warm-up")]


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def sweep_result(summary: dict) -> dict:
    """The section from a sweep's summary.json: trials by their last training loss."""
    trials = sorted(summary["trials"], key=lambda t: (t["state"] != "SUCCEEDED", t["last_metric"] or float("inf")))
    head = "| trial | " + " | ".join(label for _, label in COLUMNS) + " | state | step | loss | eval loss | dense / sent |"
    rows = [f"| {t['id']} | " + " | ".join(_cell(t["parameters"][k]) for k, _ in COLUMNS)
            + f" | {t['state']} | {t['step']} | {t['last_metric']:.4f} | "
            + (f"{t['eval_loss']:.4f}" if t.get("eval_loss") is not None else "")
            + (f" | {t['compression']:.0f}x |" if t.get("compression") is not None else " | |") for t in trials]
    best = summary["best"]
    markdown = [
        "## Local steps: the compression sweep (jobs/examples/sweep-local.yaml, 300 steps, 2 workers per trial)",
        "",
        f"`python -m tests.bench --sections local-sweep`: `python -m jobs.sweep` on the shipped spec, "
        f"{len(trials)} trials ({summary['search']}, {summary['scheduler']}: a trial behind at 96, 192 or 288 "
        "steps stops early), the demo model on the stdlib corpus; loss = training loss at the trial's last report "
        "(at the end the mean over the final window; the sweep's metric), eval loss = held-out loss at the end, "
        "dense / sent = bytes a dense ring allreduce every step would send over the bytes sent (a dense warm-up "
        "counts at full size; an early-stopped trial's saving is the one at its stop, where a 48-step warm-up is half "
        "of 96 steps). The search ranks by loss alone: weigh it against the last column. The frontier "
        "tables run the lowest-loss trial, the lowest at >= 100x and the lowest at >= 1000x for 900 steps.",
        "",
        head,
        "|" + "---|" * (len(COLUMNS) + 6),
        *rows,
        "",
        f"Best by the sweep's metric: {best['trial_id']} ({summary['metric']} {best['value']:.4f}); the sweep took "
        f"{summary['wall_time_s']:.0f} s.",
    ]
    return {"data": {"name": "local_sweep", "trials": trials, "best": best}, "markdown": markdown}


def sweep_section(scratch: Path) -> dict:
    out = scratch / "sweep-local"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "jobs.sweep", "--spec", str(SPEC), "--out", str(out)], cwd=ROOT, env=env,
                   check=True)
    return sweep_result(json.loads((out / "summary.json").read_text()))


def main() -> None:
    from tests.bench.__main__ import run_env, write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, required=True, help="a sweep-local run's summary.json")
    summary = json.loads(parser.parse_args().summary.read_text())
    print("\n".join(write_section(sweep_result(summary), run_env(summary["wall_time_s"]))))


if __name__ == "__main__":
    main()
