"""Hyperparameter sweep of real distributed training runs: ``python -m jobs.sweep --spec FILE``.

Runs the same ways as jobs.train: directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.sweep ...``, or submitted by the control plane (``--out DIR``).

Ray Tune drives the trials (jobs/runtime/tuner.py); each trial (jobs/runtime/sweep_trial.py) is a Tune
function. A trial of one worker trains in its own Tune actor (no Ray Train run to start; Tune reuses
the actor for the next trial); a trial of more workers builds its TorchTrainer
(jobs/runtime/trainer.py) under a run name of its own and runs it, a full Ray Train run with its own
workers, checkpoints and failure handling (under PBT in segments, each from the checkpoint Tune
hands over). ASHA stops trials early on their reports.

``--out DIR`` holds Tune's experiment (``tune/``), each trial's runs (``trials/<id>/``), the trial
events (``trials.jsonl``, jobs/contracts/sweep_events.py: what the control plane shows live), stop
requests (``control/trials/``) and, at the end, ``summary.json`` with the trials and the best. Rerunning the
same command on a DIR that holds an experiment resumes it (``Tuner.restore``): finished trials stay,
interrupted ones continue from their latest checkpoint.

Exit codes: 0 done (some trial finished), 2 invalid spec or arguments (nothing ran), 1 a failure
(missing corpus, every trial failed), each with a one-paragraph message instead of a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from jobs.contracts.sweep_events import SUMMARY_FILE, SweepSummary, TrialState, fold, read_events
from jobs.kinds.train import DATA_TASK_CPUS
from jobs.specs.base import SpecError
from jobs.specs.sweep import SweepSpec, load_sweep_spec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help="YAML (or JSON) sweep spec, e.g. jobs/examples/sweep.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set base.train.steps=60 (repeatable)")
    p.add_argument("--out", help="output folder; a rerun on a folder holding a sweep resumes it")
    p.add_argument("--verbose", action="store_true", help="also show the logs of the trials and of Ray")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, flush=True)


def summarize(spec: SweepSpec, out: Path, elapsed_s: float) -> SweepSummary:
    view = fold(read_events(out), out=out, metric=spec.metric, mode=spec.mode, total_steps=spec.base.train.steps)
    return SweepSummary(**view.model_dump(), name=spec.name, search=spec.search, scheduler=spec.scheduler.type,
                        trials_total=spec.n_trials, wall_time_s=round(elapsed_s, 1))


def print_summary(s: SweepSummary, out: Path) -> None:
    lines = ["", f"== {s.name}: {len(s.trials)} trials ({s.search}, {s.scheduler}) in {s.wall_time_s:.0f} s =="]
    for t in s.trials:
        value = f"{t.last_metric:.4f}" if t.last_metric is not None else "n/a"
        sent = f"{t.compression:.0f}x" if t.compression is not None else "n/a"
        lines.append(f"  {t.id}  {t.state.value:<13} step {t.step:>6}  {s.metric} {value}  dense/sent {sent:>6}  "
                     f"{t.parameters}")
    if s.best is not None:
        lines.append(f"best: {s.best.trial_id} {s.metric} {s.best.value:.4f} {s.best.parameters}; "
                     f"checkpoint {s.best.checkpoint}")
    lines.append(f"summary: {out / SUMMARY_FILE}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_sweep_spec(args.spec, args.set)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # deferred: Ray, Tune and torch load (~3 s) once the spec is known good, so --help and a bad spec answer at once
    from ray import tune

    from jobs.runtime.sweep_trial import run_trial
    from jobs.runtime.trainer import init_ray
    from jobs.runtime.tuner import SweepStateError, make_tuner
    from workers.data import DataError, open_training_data, s3_env
    from workers.device import DeviceUnavailable, check_available

    base = spec.trial_spec({})
    try:
        check_available(base.resources.device)
        data = open_training_data(base.data, base.model.vocab_size, _log)
    except (DataError, DeviceUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _log(f"sweep: {spec.n_trials} trials ({spec.search}, {spec.scheduler.type}), {spec.max_concurrent} at once, "
         f"{spec.workers_per_trial} workers each on {base.resources.device}; output in {out}")
    # An embedded cluster holds every concurrent trial's workers and each one's Ray Data task (init_ray
    # leaves headroom for one; the others are counted here as workers).
    res = base.resources
    extra_data_workers = math.ceil((spec.max_concurrent - 1) * DATA_TASK_CPUS / res.cpus_per_worker)
    room = res.model_copy(update={"num_workers": spec.workers_per_trial * spec.max_concurrent + extra_data_workers})
    init_ray(base.model_copy(update={"resources": room}), args.verbose)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # trials.jsonl is the feed
    trainable = tune.with_parameters(run_trial, sweep=spec.model_dump(mode="json"), data=data, out=str(out),
                                     s3=s3_env())
    try:
        tuner = make_tuner(spec, trainable, out)
    except SweepStateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tuner.fit()
    summary = summarize(spec, out, time.perf_counter() - started)
    (out / SUMMARY_FILE).write_text(summary.model_dump_json(indent=2))
    print_summary(summary, out)
    failed = [t for t in summary.trials if t.state is TrialState.FAILED]
    if summary.trials and len(failed) == len(summary.trials):
        print(f"error: every trial failed; the first: {failed[0].error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
