"""Sweeps: Tune's overhead over the trials it runs, and what ASHA finds against random search.

Both run ``python -m jobs.sweep``'s own driver pieces (make_tuner, run_trial) in this process on an
embedded cluster, with real training trials of a tiny model (one worker each).

- Overhead: N short trials at a fixed concurrency C under FIFO. Each trial's own run time (from
  entering its Tune function to leaving it: its Train run, start-up included) is timed inside the
  trial; ideal = sum of those / C; the figure is the sweep's wall time / ideal (1.0: Tune adds
  nothing; the goal is <= 1.2). Tune's share is its own start-up, scheduling and result handling.
- Search quality: the same space, seed and number of trials under random search (FIFO: every trial
  runs all its steps) and ASHA; the best held-out loss among the trials that finished, and the steps
  each sweep trained in all (ASHA's saving).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "jobs" / "examples" / "sweep-demo.yaml"
OVERHEAD_TRIALS, CONCURRENCY, OVERHEAD_STEPS = 4, 2, 10
QUALITY_TRIALS, QUALITY_STEPS = 4, 20
TIMINGS = "timings"


def timed_trial(config: dict[str, Any], *, sweep: dict[str, Any], data: Any, out: str) -> None:
    """run_trial, timed from inside the trial (the trial's own run time)."""
    from ray import tune

    from jobs.sweep import run_trial

    start = time.time()
    run_trial(config, sweep=sweep, data=data, out=out)
    path = Path(out) / TIMINGS / f"{tune.get_context().get_trial_id()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"start": start, "end": time.time()}))


def _spec(overrides: dict[str, Any]) -> Any:
    from jobs.sweep_spec import SweepSpec

    raw = yaml.safe_load(SPEC.read_text())
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("/")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return SweepSpec.model_validate(raw)


def _sweep(spec: Any, data: Any, out: Path) -> tuple[float, Any]:
    from ray import tune

    from jobs.sweep import make_tuner, summarize

    out.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_parameters(timed_trial, sweep=spec.model_dump(mode="json"), data=data, out=str(out))
    t0 = time.perf_counter()
    make_tuner(spec, trainable, out).fit()
    wall = time.perf_counter() - t0
    return wall, summarize(spec, out, wall)


def sweeps_section(scratch: Path) -> dict:
    from jobs.trainer import init_ray
    from workers.data import open_training_data

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    base = _spec({}).trial_spec({})
    data = open_training_data(base.data, base.model.vocab_size, print)
    room = base.resources.model_copy(update={"num_workers": CONCURRENCY * 2 - 1})  # jobs.sweep's room rule
    init_ray(base.model_copy(update={"resources": room}), verbose=False)

    overhead = _spec({"trials": OVERHEAD_TRIALS, "max_concurrent": CONCURRENCY, "scheduler": {"type": "fifo"},
                      "report_every": 5, "base/train/steps": OVERHEAD_STEPS})
    wall, _ = _sweep(overhead, data, scratch / "overhead")
    spans = [json.loads(p.read_text()) for p in (scratch / "overhead" / TIMINGS).glob("*.json")]
    ideal = sum(s["end"] - s["start"] for s in spans) / CONCURRENCY
    rows: dict[str, Any] = {"overhead": {"trials": len(spans), "concurrency": CONCURRENCY, "wall_s": round(wall, 1),
                                         "ideal_s": round(ideal, 1), "ratio": round(wall / ideal, 3)}}

    quality = {}
    for label, scheduler in (("random", {"type": "fifo"}), ("asha", {"type": "asha", "grace_period": 5,
                                                                     "reduction_factor": 2})):
        spec = _spec({"trials": QUALITY_TRIALS, "max_concurrent": CONCURRENCY, "scheduler": scheduler,
                      "report_every": 5, "base/train/steps": QUALITY_STEPS,
                      "space": {"train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-2},
                                "compression.density": {"type": "choice", "values": [0.01, 0.1]}}})
        wall, summary = _sweep(spec, data, scratch / label)
        finished = [t for t in summary.trials if t.eval_loss is not None]
        quality[label] = {"trials": len(summary.trials), "finished": len(finished), "wall_s": round(wall, 1),
                          "steps_trained": sum(t.step for t in summary.trials),
                          "best_eval_loss": round(min(t.eval_loss for t in finished), 4) if finished else None}
    rows["quality"] = quality
    o = rows["overhead"]
    md = ["## Sweeps (Ray Tune driving real training trials)", "",
          f"`python -m tests.bench --sections sweeps`: {o['trials']} trials of {OVERHEAD_STEPS} steps at "
          f"concurrency {CONCURRENCY}; ideal = the trials' own run times summed / concurrency.", "",
          "| measure | value |", "|---|---|",
          f"| sweep wall time | {o['wall_s']} s |", f"| ideal | {o['ideal_s']} s |",
          f"| **wall / ideal** (goal <= 1.2) | **{o['ratio']}** |", "",
          f"Search quality: {QUALITY_TRIALS} trials of up to {QUALITY_STEPS} steps each, same space and seed.", "",
          "| search | trials finished | steps trained | best eval loss | wall |", "|---|---|---|---|---|"]
    for label, q in quality.items():
        md.append(f"| {label} | {q['finished']}/{q['trials']} | {q['steps_trained']} | {q['best_eval_loss']} "
                  f"| {q['wall_s']} s |")
    return {"data": {"name": "sweeps", **rows}, "markdown": md}
