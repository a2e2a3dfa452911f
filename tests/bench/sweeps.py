"""Sweeps: Tune's overhead over the trials it runs, and what each search finds with the same budget.

Both run ``python -m jobs.sweep``'s own driver pieces (make_tuner, run_trial) in this process on an
embedded cluster, with real training trials of a tiny model (the demo sweep's, one worker each).

Three sweeps of the same space, seed and trial budget (N trials, C at once): random search (FIFO:
every trial runs all its steps), random search with ASHA, and Optuna's TPE (FIFO, searching on the
trials' final training loss). HyperOpt's TPE is left out: one more sweep for a second TPE.

- Overhead, of every sweep: each trial's own run time (from entering its Tune function to leaving
  it: its Train run, start-up included) is timed inside the trial; ideal = sum of those / C; the
  figure is fit()'s wall time / ideal (1.0: Tune adds nothing; the goal is <= 1.1). For the random
  sweep, where the rest goes: Tune's start-up (fit() to the first trial's function), its tear-down
  (the last trial's return to fit() returning), and the time a slot stands empty between one
  trial's end and the next one's start; and beside it, the training's start-up inside a trial's
  own run time (trial start to its first report, less the steps before it).
- Trial start-up (issue 23), before and after in one run: each trial's seconds from Tune starting
  it to its first step (its first report, less the steps that report covers), for the random sweep
  with every trial a Ray Train run of one worker (as before: ``as_train_runs``, bench only) and then
  as the product runs a one-worker trial, in its Tune actor (jobs/runtime/sweep_trial.py). A
  trial's Train run starts ~9 actors, each in a new process (Ray places no actor on its idle
  workers); a trial in its actor starts none but its Ray Data read tasks.
- Search quality: the best held-out loss among the trials that ran all their steps, that trial's
  values, and the steps each sweep trained in all (ASHA's saving).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "jobs" / "examples" / "sweep-demo.yaml"
CONCURRENCY, EVERY, TRIALS, STEPS = 2, 5, 6, 20
SPACE = {"train.lr": {"type": "loguniform", "low": 3e-4, "high": 3e-2},
         "compression.density": {"type": "choice", "values": [0.01, 0.1]}}
ASHA = {"type": "asha", "grace_period": 5, "reduction_factor": 2}
# label -> (search, scheduler); the first is also the overhead figure's sweep (FIFO: no trial cut short).
SWEEPS = {"random": ("random", {"type": "fifo"}), "random + ASHA": ("random", ASHA),
          "optuna (TPE)": ("optuna", {"type": "fifo"})}
TIMINGS = "timings"
ROW = "row.json"  # a finished sweep's figures, kept for --reuse
BEFORE = "before"  # the start-up comparison's sweep of Train-run trials (its folder and row label)


@contextlib.contextmanager
def as_train_runs() -> Any:
    """In this process, every sweep's one-worker trials are Ray Train runs, as before they trained in
    their Tune actors (both where the driver reserves a trial's resources and in the trial)."""
    from jobs.specs.sweep import SweepSpec

    with mock.patch.object(SweepSpec, "trials_in_actor", new=property(lambda self: False)):
        yield


def timed_trial(config: dict[str, Any], *, train_run: bool = False, **params: Any) -> None:
    """run_trial, timed from inside the trial (the trial's own run time); ``train_run``: as a Ray Train
    run (``as_train_runs``). The end is written when the function returns; a trial that Tune stops
    (ASHA, at a cut or at max_t) never returns, as its actor goes, and ends at its "complete" event
    instead (_spans)."""
    from ray import tune

    from jobs.runtime.sweep_trial import run_trial

    path = Path(params["out"]) / TIMINGS / f"{tune.get_context().get_trial_id()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    path.write_text(json.dumps({"start": start}))
    with as_train_runs() if train_run else contextlib.nullcontext():
        run_trial(config, **params)
    path.write_text(json.dumps({"start": start, "end": time.time()}))


def _spans(out: Path, events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """trial id -> its own run's start and end (unix s); ``events``: the sweep's trial events."""
    completed = {e["trial"]: e["at"] for e in events if e["event"] in ("complete", "error")}
    spans = {p.stem: json.loads(p.read_text()) for p in (out / TIMINGS).glob("*.json")}
    return {t: {"start": s["start"], "end": s.get("end", completed.get(t, s["start"]))} for t, s in spans.items()}


def _spec(overrides: dict[str, Any]) -> Any:
    from jobs.specs.sweep import SweepSpec

    raw = yaml.safe_load(SPEC.read_text())
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("/")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return SweepSpec.model_validate(raw)


def _idle_slot_s(spans: list[dict[str, float]], t0: float, t1: float, slots: int) -> float:
    """Seconds, summed over the ``slots``, that a slot stood empty between ``t0`` and ``t1``."""
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    idle, running, last = 0.0, 0, t0
    for at, change in [e for e in edges if e[0] <= t1] + [(t1, 0)]:
        idle += (slots - min(running, slots)) * (at - last)
        running, last = running + change, at
    return idle


def _overhead(out: Path, t0: float, t1: float) -> dict[str, Any]:
    """wall / ideal of the sweep in ``out`` (fit() from ``t0`` to ``t1``) and where the difference went."""
    from jobs.contracts.sweep_events import read_events

    events = read_events(out)
    spans = _spans(out, events)
    runs = [s["end"] - s["start"] for s in spans.values()]
    ideal, wall = sum(runs) / CONCURRENCY, t1 - t0
    first, last = min(s["start"] for s in spans.values()), max(s["end"] for s in spans.values())
    last_start = max(s["start"] for s in spans.values())
    # A trial's Train start-up: its start to its first report, less the steps that report covers (at
    # the pace of its later reports).
    reports: dict[str, list[float]] = {}
    for e in events:
        if e["event"] == "result" and e["trial"] in spans:
            reports.setdefault(e["trial"], []).append(e["at"])
    started = {e["trial"]: e["at"] for e in events if e["event"] == "start"}
    startups, trial_startups = [], []
    for trial, ats in reports.items():
        step_s = (ats[-1] - ats[0]) / ((len(ats) - 1) * EVERY) if len(ats) > 1 else 0.0
        first_step = ats[0] - EVERY * step_s
        startups.append(first_step - spans[trial]["start"])
        trial_startups.append(first_step - started.get(trial, spans[trial]["start"]))
    return {"trials": len(spans), "concurrency": CONCURRENCY, "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
            "ratio": round(wall / ideal, 3), "tune_startup_s": round(first - t0, 1),
            "tune_teardown_s": round(t1 - last, 1),
            "idle_between_trials_s": round(_idle_slot_s(list(spans.values()), first, last_start, CONCURRENCY)
                                           / CONCURRENCY, 1),
            "idle_tail_s": round((_idle_slot_s(list(spans.values()), first, last, CONCURRENCY)
                                  - _idle_slot_s(list(spans.values()), first, last_start, CONCURRENCY))
                                 / CONCURRENCY, 1),
            "trial_run_s_median": round(statistics.median(runs), 1),
            "train_startup_s_median": round(statistics.median(startups), 1) if startups else None,
            "trial_startup_s": sorted(round(t, 1) for t in trial_startups),
            "trial_startup_s_median": round(statistics.median(trial_startups), 1) if trial_startups else None}


def _sweep(label: str, search: str, scheduler: dict[str, Any], data: Any, out: Path,
           train_run: bool = False) -> dict[str, Any]:
    """One sweep of the same space, seed and budget with ``search`` and ``scheduler``: its overhead
    and the best trial that ran all its steps."""
    from ray import tune

    from jobs.runtime.tuner import make_tuner
    from jobs.sweep import summarize
    from workers.data import s3_env

    spec = _spec({"trials": TRIALS, "max_concurrent": CONCURRENCY, "search": search, "scheduler": scheduler,
                  "report_every": EVERY, "base/train/steps": STEPS, "space": SPACE})
    out.mkdir(parents=True)
    trainable = tune.with_parameters(timed_trial, sweep=spec.model_dump(mode="json"), data=data, out=str(out),
                                     s3=s3_env(), train_run=train_run)
    t0 = time.time()
    make_tuner(spec, trainable, out).fit()
    t1 = time.time()
    summary = summarize(spec, out, t1 - t0)
    finished = [t for t in summary.trials if t.eval_loss is not None]
    best = min(finished, key=lambda t: t.eval_loss) if finished else None
    return {"label": label, "search": search, "scheduler": scheduler["type"], "trials": len(summary.trials),
            "finished": len(finished), "steps_trained": sum(t.step for t in summary.trials),
            "best_eval_loss": round(best.eval_loss, 4) if best else None,
            "best_parameters": best.parameters if best else None, "overhead": _overhead(out, t0, t1)}


def _startup_markdown(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    b, a = before["overhead"], after["overhead"]
    return [f"Trial start-up, before and after in this run: the {after['label']} sweep (FIFO) with every trial a "
            "Ray Train run of one worker (as before) and with each trial training in its own Tune actor (the "
            "product's one-worker trials). A trial's start-up: Tune starting it to its first step (its first "
            "report, less the steps that report covers).", "",
            "| measure | before (trials as Train runs) | after (in their Tune actors) | after / before |",
            "|---|---|---|---|",
            f"| trial start-up, median (goal <= 8 s) | {b['trial_startup_s_median']} s | "
            f"**{a['trial_startup_s_median']} s** | {round(a['trial_startup_s_median'] / b['trial_startup_s_median'], 2)} |",
            f"| trial start-up, each trial | {b['trial_startup_s']} | {a['trial_startup_s']} | |",
            f"| a trial's own run time (median) | {b['trial_run_s_median']} s | {a['trial_run_s_median']} s | "
            f"{round(a['trial_run_s_median'] / b['trial_run_s_median'], 2)} |",
            f"| Tune's start-up (fit() to the first trial's function) | {b['tune_startup_s']} s | "
            f"{a['tune_startup_s']} s | |",
            f"| slots empty between trials (summed / concurrency; a trial actor's own start, hidden from "
            f"the start-up above, is here) | {b['idle_between_trials_s']} s | {a['idle_between_trials_s']} s | |",
            f"| sweep wall time | {b['wall_s']} s | {a['wall_s']} s | {round(a['wall_s'] / b['wall_s'], 2)} |",
            f"| wall / ideal | {b['ratio']} | {a['ratio']} | |", ""]


def _markdown(rows: list[dict[str, Any]], before: dict[str, Any]) -> list[str]:
    o = rows[0]["overhead"]
    md = ["## Sweeps (Ray Tune driving real training trials)", "",
          f"`python -m tests.bench --sections sweeps`: sweeps of {TRIALS} trials of up to {STEPS} steps of the "
          f"demo sweep's tiny model (one worker each), {CONCURRENCY} at once, the same space (train.lr "
          "loguniform 3e-4..3e-2, compression.density 0.01 or 0.1) and seed.", "",
          f"Tune overhead, the {rows[0]['label']} sweep (FIFO): ideal = the trials' own run times (timed inside "
          "each trial, its training's start-up included) summed / concurrency.", "",
          "| measure | value |", "|---|---|",
          f"| sweep wall time (fit()) | {o['wall_s']} s |", f"| ideal | {o['ideal_s']} s |",
          f"| **wall / ideal** (goal <= 1.1) | **{o['ratio']}** |",
          f"| wall - ideal | {round(o['wall_s'] - o['ideal_s'], 1)} s |",
          f"| = Tune's start-up (fit() to the first trial's function) | {o['tune_startup_s']} s |",
          f"| + Tune's tear-down (the last trial's return to fit()'s) | {o['tune_teardown_s']} s |",
          f"| + slots empty between one trial's end and the next one's start (summed / concurrency) "
          f"| {o['idle_between_trials_s']} s |",
          f"| + slots empty after the last trial started (the last wave's spread; summed / concurrency) "
          f"| {o['idle_tail_s']} s |",
          f"| a trial's own run time (median) | {o['trial_run_s_median']} s |",
          f"| of which its training's start-up (median) | {o['train_startup_s_median']} s |", "",
          *_startup_markdown(before, rows[0]),
          "Search quality at the same trial budget: the searches see each trial's final training loss; best "
          "eval loss is the lowest held-out loss among the trials that ran all their steps. ASHA: grace "
          f"period {ASHA['grace_period']} steps, reduction factor {ASHA['reduction_factor']}. TPE samples the "
          "first half of the budget at random.", "",
          "| search | scheduler | trials finished | steps trained | best eval loss | its train.lr, density "
          "| wall | wall / ideal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["best_parameters"] or {}
        values = f"{p['train.lr']:.2e}, {p['compression.density']}" if p else "n/a"
        md.append(f"| {r['label']} | {r['scheduler']} | {r['finished']}/{r['trials']} | {r['steps_trained']} "
                  f"| {r['best_eval_loss']} | {values} | {r['overhead']['wall_s']} s | {r['overhead']['ratio']} |")
    md += ["", "One seed and a handful of trials per search: a single draw each, not a ranking."]
    return md


def sweeps_section(scratch: Path, reuse: bool = False) -> dict:
    """Run the sweeps; with ``reuse``, a sweep whose row an earlier (interrupted) bench saved is kept.
    A sweep without a saved row is rerun from nothing: its left-over experiment would be resumed.
    First the start-up comparison's sweep of Train-run trials, on a cluster of its own."""
    if not reuse:
        shutil.rmtree(scratch, ignore_errors=True)
    labels = [BEFORE, *SWEEPS]
    saved = {i: scratch / ("sweep-before" if i == 0 else f"sweep-{i - 1}") / ROW for i in range(len(labels))}
    rows: dict[int, dict[str, Any]] = {i: json.loads(p.read_text()) for i, p in saved.items() if p.exists()}
    rows = {i: r for i, r in rows.items()  # only rows of this module's settings
            if (r["label"], r["trials"], r["overhead"]["concurrency"]) == (labels[i], TRIALS, CONCURRENCY)
            and "trial_startup_s" in r["overhead"]}
    if 0 not in rows:
        with as_train_runs():
            rows.update(_run_sweeps({0: (BEFORE, SWEEPS["random"])}, saved, train_run=True))
    todo = {i: SWEEPS[label] for i, label in enumerate(labels) if i and i not in rows}
    rows.update(_run_sweeps({i: (labels[i], todo[i]) for i in todo}, saved))
    ordered = [rows[i] for i in range(1, len(labels))]
    return {"data": {"name": "sweeps", "sweeps": ordered, "startup_before": rows[0]},
            "markdown": _markdown(ordered, rows[0])}


def _run_sweeps(todo: dict[int, tuple[str, tuple[str, dict[str, Any]]]], saved: dict[int, Path],
                train_run: bool = False) -> dict:
    """Run the sweeps ``todo`` (index -> label, (search, scheduler)) on one new embedded cluster,
    saving each row; index -> row."""
    import ray

    from jobs.runtime.trainer import init_ray
    from workers.data import open_training_data

    if not todo:
        return {}
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    base = _spec({}).trial_spec({})
    data = open_training_data(base.data, base.model.vocab_size, print)
    room = base.resources.model_copy(update={"num_workers": CONCURRENCY * 2 - 1})  # jobs.sweep's room rule
    init_ray(base.model_copy(update={"resources": room}), verbose=False)
    rows = {}
    try:
        for i, (label, (search, scheduler)) in todo.items():
            shutil.rmtree(saved[i].parent, ignore_errors=True)
            rows[i] = _sweep(label, search, scheduler, data, saved[i].parent, train_run)
            saved[i].write_text(json.dumps(rows[i]))
    finally:
        ray.shutdown()
    return rows
