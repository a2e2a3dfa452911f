"""A sweep's trial events and stop requests: the files between its driver and whoever watches it.

The driver (jobs/sweep.py, through its Tuner's callback in jobs/runtime/tuner.py) appends one JSON
line per trial event (start, result, checkpoint, complete, error) to ``<out>/trials.jsonl``;
the control plane reads the file to show the trials live, and the driver folds the same file into
``summary.json`` at the end. One writer, appends of one ``write`` each on an
``O_APPEND`` descriptor, so a reader sees whole lines (a torn last line, from a killed driver, is
skipped). A driver restarted on the same folder keeps appending: a trial that starts again continues
its history.

Stopping one trial goes the other way: ``<out>/control/trials/<trial_id>.stop`` (written atomically);
the trial passes it to its training loop, which checkpoints at the end of its current step and ends
(jobs/runtime/sweep_trial.py), and the driver's Tune stopper looks for it at each of the trial's reports.

Torch-free and Ray-free: the control plane imports it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from jobs.contracts.terminal import PublishesTerminal

EVENTS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
STOP_DIR = Path("control") / "trials"
# Points of one trial's curve a reader gets: enough for a chart, bounded for a long run.
HISTORY_MAX_POINTS = 200
# Characters of a trial's error kept: the end of its traceback (the exception and its cause).
ERROR_MAX_CHARS = 2000


class TrialState(PublishesTerminal, str, Enum):
    PENDING = "PENDING"  # created by Tune, waiting for room
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"  # PBT: between segments, or continuing from another trial's checkpoint
    SUCCEEDED = "SUCCEEDED"  # ran all its steps
    EARLY_STOPPED = "EARLY_STOPPED"  # stopped by the scheduler before its last step
    STOPPED = "STOPPED"  # stopped on request, or because the sweep was stopped
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (TrialState.SUCCEEDED, TrialState.EARLY_STOPPED, TrialState.STOPPED, TrialState.FAILED)


class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TrialView(_View):
    id: str
    state: TrialState = TrialState.PENDING
    parameters: dict[str, Any] = {}
    iteration: int = 0  # reports so far
    step: int = 0
    total_steps: int
    last_metric: float | None = None
    best_metric: float | None = None
    eval_loss: float | None = None
    compression: float | None = None  # dense bytes / bytes sent, at the latest report
    checkpoint: str | None = None
    error: str | None = None
    stop_requested: bool = False
    started_at: float | None = None
    ended_at: float | None = None
    history: list[dict[str, float]] = []


class Best(_View):
    trial_id: str
    value: float
    step: int
    checkpoint: str | None
    parameters: dict[str, Any]


class SweepView(_View):
    metric: str
    mode: str
    trials: list[TrialView]
    counts: dict[TrialState, int]
    best: Best | None


class SweepSummary(SweepView):
    """``summary.json`` of a finished sweep."""

    name: str
    search: str
    scheduler: str
    trials_total: int
    wall_time_s: float


def append_event(out: Path, event: str, trial: str, **fields: Any) -> None:
    """One line in ``out/trials.jsonl``, in a single write on an O_APPEND descriptor."""
    line = json.dumps({"event": event, "trial": trial, "at": time.time(), **fields}, allow_nan=False) + "\n"
    fd = os.open(out / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(out: Path) -> list[dict[str, Any]]:
    """The events so far; none when the sweep has not started. A line that does not parse (the torn
    end of a killed writer) is skipped."""
    try:
        text = (out / EVENTS_FILE).read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("trial"), str):
            events.append(record)
    return events


def request_stop(out: Path, trial_id: str, reason: str) -> float:
    """Ask the driver to stop ``trial_id`` at its next report; returns when it was asked (unix s)."""
    at = time.time()
    path = out / STOP_DIR / f"{trial_id}.stop"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({"trial": trial_id, "reason": reason, "requested_at": at}))
    os.replace(tmp, path)
    return at


def stop_requested(out: Path, trial_id: str) -> bool:
    return (out / STOP_DIR / f"{trial_id}.stop").exists()


def trial_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A Tune result from one of the loop's reports: ``{"step", "loss"}`` at a checkpoint, RunMetrics
    at the end (loss: the mean over the final window; eval_loss when there is a held-out set); each
    with the bytes sent so far and ``compression``, dense bytes over them (the loop's ``sent()``;
    what a sweep of the compression settings weighs a trial's loss against)."""
    sent = {"wire_bytes": int(m["wire_bytes"]), "compression": float(m["compression"])}
    if "steps" not in m:
        return {"step": int(m["step"]), "loss": float(m["loss"]), **sent}
    final = {"step": int(m["steps"]), "loss": m["final_loss"], "tokens_per_s": m["tokens_per_s"], **sent}
    return final if m.get("eval_loss") is None else {**final, "eval_loss": m["eval_loss"]}


def _thin(points: list[dict[str, float]], limit: int) -> list[dict[str, float]]:
    """At most ``limit`` points spread evenly, the first and the last kept."""
    if len(points) <= limit:
        return points
    picks = {round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)}
    return [points[i] for i in sorted(picks)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fold(events: Iterable[dict[str, Any]], *, out: Path, metric: str, mode: str, total_steps: int,
         history_max_points: int = HISTORY_MAX_POINTS) -> SweepView:
    """The trials as the events tell them, in start order, with the best trial by its last metric
    (Tune's "last" scope: an early-stopped trial competes with the loss it had when stopped; a
    failed one does not compete)."""
    trials: dict[str, TrialView] = {}
    better = min if mode == "min" else max
    for e in events:
        tid = e["trial"]
        t = trials.setdefault(tid, TrialView(id=tid, total_steps=total_steps))
        kind = e.get("event")
        if kind == "start":
            t.state, t.ended_at, t.error = TrialState.RUNNING, None, None
            t.parameters = e.get("parameters") or t.parameters
            t.started_at = t.started_at or e.get("at")
        elif kind == "result":
            m = e.get("metrics") or {}
            t.iteration += 1
            t.step = int(m.get("step", t.step))
            t.checkpoint = m.get("checkpoint") or t.checkpoint
            value = _number(m.get(metric))
            if value is not None:
                t.last_metric = value
                t.best_metric = value if t.best_metric is None else better(t.best_metric, value)
            t.eval_loss = _number(m.get("eval_loss")) if "eval_loss" in m else t.eval_loss
            t.compression = _number(m.get("compression")) if "compression" in m else t.compression
            t.history.append({k: float(v) for k, v in m.items()
                              if k in ("step", "loss", "eval_loss") and _number(v) is not None})
        elif kind == "checkpoint":
            t.checkpoint = e.get("path") or t.checkpoint
        elif kind == "pause":
            t.state = TrialState.PAUSED
        elif kind in ("complete", "error"):
            t.state = TrialState(e.get("state") or TrialState.FAILED)
            t.ended_at = e.get("at")
            t.error = (e.get("error") or "")[-ERROR_MAX_CHARS:] or None
    views = list(trials.values())
    for t in views:
        t.stop_requested = stop_requested(out, t.id)
        t.history = _thin(t.history, history_max_points)
    counts: dict[TrialState, int] = {}
    for t in views:
        counts[t.state] = counts.get(t.state, 0) + 1
    scored = [t for t in views if t.last_metric is not None and t.state is not TrialState.FAILED]
    best = None
    if scored:
        top = better(scored, key=lambda t: t.last_metric)
        best = Best(trial_id=top.id, value=top.last_metric, step=top.step, checkpoint=top.checkpoint,
                    parameters=top.parameters)
    return SweepView(metric=metric, mode=mode, trials=views, counts=counts, best=best)


def read_sweep(out: Path, *, metric: str, mode: str, total_steps: int) -> SweepView:
    return fold(read_events(out), out=out, metric=metric, mode=mode, total_steps=total_steps)
