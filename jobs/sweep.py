"""Hyperparameter sweep of real distributed training runs: ``python -m jobs.sweep --spec FILE``.

Runs the same ways as jobs.train: directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.sweep ...``, or submitted by the control plane (``--out DIR``).

Ray Tune drives the trials; each trial (jobs/sweep_trial.py) is a Tune function that builds the
trial's TorchTrainer (jobs.trainer.build_trainer) under a run name of its own and runs it, so a trial
is a full Ray Train run with its own workers, checkpoints and failure handling. Rank 0's reports
reach Tune through Ray's TuneReportCallback; ASHA stops trials early on them. Tune never holds those
checkpoints, only their paths, so for PBT a trial runs in segments of perturbation_interval steps,
each a new Train run started from the previous segment's checkpoint or, after an exploit, the
donor's, and each segment ends with ``tune.report(metrics, checkpoint=...)``.

``--out DIR`` holds Tune's experiment (``tune/``), each trial's runs (``trials/<id>/``), the trial
events (``trials.jsonl``, jobs/sweep_events.py: what the control plane shows live), stop requests
(``control/trials/``) and, at the end, ``summary.json`` with the trials and the best. Rerunning the
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
from typing import Any

from jobs.specs import SpecError
from jobs.sweep_events import (
    ERROR_MAX_CHARS,
    SUMMARY_FILE,
    SweepSummary,
    TrialState,
    append_event,
    read_events,
    stop_requested,
)
from jobs.sweep_spec import (
    MODEL_BASED_SEARCHES,
    AshaScheduler,
    Choice,
    LogUniform,
    PbtScheduler,
    RandInt,
    SweepSpec,
    load_sweep_spec,
)
from jobs.sweep_trial import run_trial

EXPERIMENT = "tune"  # Tune's experiment folder inside --out; fixed so a rerun finds it
# Restarts of a trial whose Train run failed as a whole (its workers' own restarts are the base spec's
# resources.max_failures): the trial resumes from its latest checkpoint (its run name is stable).
TRIAL_RETRIES = 2
# Logical CPUs a trial's Tune actor reserves: it only waits on its Train run, whose workers reserve
# their own (Tune refuses an empty request, so a token amount).
TRIAL_DRIVER_CPUS = 0.01
# The libraries' own numbers of random trials before TPE models the results (_startup_trials).
OPTUNA_STARTUP_TRIALS, HYPEROPT_STARTUP_TRIALS = 10, 20


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


# -- the driver ---------------------------------------------------------------------------------------


def _dimension(dim: Any, grid: bool) -> Any:
    from ray import tune

    if isinstance(dim, Choice):
        return tune.grid_search(dim.values) if grid else tune.choice(dim.values)
    if isinstance(dim, RandInt):
        return tune.randint(dim.low, dim.high + 1)  # Tune's upper bound is exclusive
    if isinstance(dim, LogUniform):
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {"params": {path: _dimension(dim, spec.search == "grid") for path, dim in spec.space.items()}}


def _scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sched, steps = spec.scheduler, spec.base.train.steps
    if isinstance(sched, AshaScheduler):
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=sched.grace_period,
                             reduction_factor=sched.reduction_factor)
    if isinstance(sched, PbtScheduler):
        mutations = {path: _dimension(dim, grid=False) for path, dim in spec.space.items()}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=sched.perturbation_interval,
                                       hyperparam_mutations={"params": mutations},
                                       quantile_fraction=sched.quantile_fraction,
                                       resample_probability=sched.resample_probability, synch=False)
    return FIFOScheduler()


def _startup_trials(spec: SweepSpec, library_default: int) -> int:
    """Trials a TPE search samples at random before it models the results: half the budget, at most
    the library's default. The defaults (Optuna 10, HyperOpt 20) exceed a typical sweep's whole
    budget, which would make either a random search under another name."""
    return min(library_default, math.ceil(spec.n_trials / 2))


def _search(spec: SweepSpec) -> Any:
    """Tune's search for ``spec``, seeded with the base seed (the same spec samples the same values)."""
    if spec.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=spec.base.seed,
                                               n_startup_trials=_startup_trials(spec, OPTUNA_STARTUP_TRIALS)))
    if spec.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=spec.base.seed,
                              n_initial_points=_startup_trials(spec, HYPEROPT_STARTUP_TRIALS))
    from ray.tune.search import BasicVariantGenerator

    # A SearchAlgorithm, not a Searcher: Tune ignores max_concurrent_trials for it, so it limits itself.
    return BasicVariantGenerator(random_state=spec.base.seed, max_concurrent=spec.max_concurrent)


def _trial_state(trial: Any, out: Path, total_steps: int) -> TrialState:
    """How a trial that Tune completed ended: all its steps (even if a stop request came too late),
    stopped on request, or stopped by the scheduler."""
    if (trial.last_result or {}).get("step", 0) >= total_steps:
        return TrialState.SUCCEEDED
    return TrialState.STOPPED if stop_requested(out, trial.trial_id) else TrialState.EARLY_STOPPED


def _error_text(trial: Any) -> str:
    """The end of the trial's traceback (the exception and its cause), or where to look."""
    path = Path(trial.error_file) if trial.error_file else None
    if path is None or not path.exists():
        return f"the trial failed; see {trial.path}"
    return path.read_text()[-ERROR_MAX_CHARS:]


def _callbacks(spec: SweepSpec, out: Path) -> list[Any]:
    """The trial events feed (jobs/sweep_events.py) and one log line per event."""
    from ray.tune import Callback

    total, metric = spec.base.train.steps, spec.metric

    class TrialEvents(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            append_event(out, "start", trial.trial_id, parameters=trial.config["params"])
            _log(f"trial {trial.trial_id}: started {trial.config['params']}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            keep = {k: result[k] for k in ("step", "loss", "eval_loss", "tokens_per_s") if result.get(k) is not None}
            checkpoint = result.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else None)
            append_event(out, "result", trial.trial_id, metrics={**keep, "checkpoint": checkpoint})
            value = result.get(metric)
            _log(f"trial {trial.trial_id}: step {keep.get('step')}/{total} {metric} "
                 + (f"{value:.4f}" if isinstance(value, float) else "n/a"))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            state = _trial_state(trial, out, total)
            append_event(out, "complete", trial.trial_id, state=state.value)
            _log(f"trial {trial.trial_id}: {state.value}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            message = _error_text(trial)
            append_event(out, "error", trial.trial_id, state=TrialState.FAILED.value, error=message)
            _log(f"trial {trial.trial_id}: FAILED: {message.splitlines()[0] if message else ''}")

    return [TrialEvents()]


def _stopper(out: Path) -> Any:
    from ray.tune import Stopper

    class StopRequests(Stopper):
        """Stops a trial at its next report once ``control/trials/<id>.stop`` exists."""

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return stop_requested(out, trial_id)

        def stop_all(self) -> bool:
            return False

    return StopRequests()


def make_tuner(spec: SweepSpec, trainable: Any, out: Path) -> Any:
    """The Tuner for ``spec`` running ``trainable`` (run_trial, or a scripted stand-in in tests),
    restored when ``out`` already holds the experiment."""
    from ray import tune

    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS})
    if spec.metric == "eval_loss":  # known only at a trial's end: the other reports lack it
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    experiment = out / EXPERIMENT
    if tune.Tuner.can_restore(experiment):
        _log(f"sweep: resuming the experiment in {experiment}")
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=_search(spec), scheduler=_scheduler(spec),
            num_samples=1 if spec.search == "grid" else spec.n_trials,
            max_concurrent_trials=spec.max_concurrent if spec.search in MODEL_BASED_SEARCHES else None),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(out), stop=_stopper(out), verbose=0, callbacks=_callbacks(spec, out),
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
    )


def summarize(spec: SweepSpec, out: Path, elapsed_s: float) -> SweepSummary:
    from jobs.sweep_events import fold

    view = fold(read_events(out), out=out, metric=spec.metric, mode=spec.mode, total_steps=spec.base.train.steps)
    return SweepSummary(**view.model_dump(), name=spec.name, search=spec.search, scheduler=spec.scheduler.type,
                        trials_total=spec.n_trials, wall_time_s=round(elapsed_s, 1))


def print_summary(s: SweepSummary, out: Path) -> None:
    lines = ["", f"== {s.name}: {len(s.trials)} trials ({s.search}, {s.scheduler}) in {s.wall_time_s:.0f} s =="]
    for t in s.trials:
        value = f"{t.last_metric:.4f}" if t.last_metric is not None else "n/a"
        lines.append(f"  {t.id}  {t.state.value:<13} step {t.step:>6}  {s.metric} {value}  {t.parameters}")
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

    from ray import tune

    from jobs.trainer import DATA_TASK_CPUS, init_ray
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
    make_tuner(spec, trainable, out).fit()
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
