"""Hyperparameter sweep of real distributed training runs: ``python -m jobs.sweep --spec FILE``.

Runs the same ways as jobs.train: directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.sweep ...``, or submitted by the control plane (``--out DIR``).

Ray Tune drives the trials; each trial is a Tune function that builds the trial's TorchTrainer
(jobs.trainer.build_trainer) under a run name of its own and runs it, so a trial is a full Ray
Train run with its own workers, checkpoints and failure handling. Rank 0's reports reach Tune
through Ray's TuneReportCallback (``_TrialReport`` makes every report carry ``step`` and ``loss``);
ASHA stops trials early on them. Tune never holds those checkpoints, only their paths, so for PBT a
trial runs in segments of perturbation_interval steps, each a new Train run started from the
previous segment's checkpoint or, after an exploit, the donor's (``_run_segments``), and each
segment ends with ``tune.report(metrics, checkpoint=...)``.

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
import functools
import math
import os
import sys
import threading
import time
import uuid
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

EXPERIMENT = "tune"  # Tune's experiment folder inside --out; fixed so a rerun finds it
TRIAL_RUN = "train"  # the Train run name of a (non-PBT) trial inside its own folder
# Restarts of a trial whose Train run failed as a whole (its workers' own restarts are the base spec's
# resources.max_failures): the trial resumes from its latest checkpoint (its run name is stable).
TRIAL_RETRIES = 2
# How often a trial looks for a request to stop it (jobs/sweep_events.py), to end its run at once.
STOP_POLL_S = 0.5
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


# -- inside a trial ---------------------------------------------------------------------------------


def trial_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A Tune result from one of the loop's reports: ``{"step", "loss"}`` at a checkpoint, RunMetrics
    at the end (loss: the mean over the final window; eval_loss when there is a held-out set)."""
    if "steps" not in m:
        return {"step": int(m["step"]), "loss": float(m["loss"])}
    final = {"step": int(m["steps"]), "loss": m["final_loss"], "tokens_per_s": m["tokens_per_s"]}
    return final if m.get("eval_loss") is None else {**final, "eval_loss": m["eval_loss"]}


def _trial_report() -> Any:
    """Ray's TuneReportCallback, forwarding trial_metrics(rank 0's report) and the checkpoint path."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _TrialReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            super().after_report(run_context, [trial_metrics(metrics[0])], checkpoint)

    return _TrialReport()


def _with_callbacks(trainer: Any, callbacks: list[Any]) -> Any:
    """Add Train callbacks to a built trainer. build_trainer owns the RunConfig; the trainer's run
    context holds the same RunConfig object, so setting its callbacks reaches fit()."""
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), *callbacks]
    return trainer


def _segment_loop(config: dict[str, Any], *, init_checkpoint: str | None, stop_at_step: int) -> None:
    """The worker loop of one PBT segment: start from ``init_checkpoint``, stop after the checkpoint
    at ``stop_at_step`` (WorkerConfig fields the loop honours)."""
    from workers.loop import train_loop_per_worker

    worker = {**config["worker"], "init_checkpoint": init_checkpoint, "stop_at_step": stop_at_step}
    train_loop_per_worker({**config, "worker": worker})


def _run_segments(spec: Any, data: Any, trial_out: Path, interval: int) -> None:
    """PBT: segments of ``interval`` steps, each a new Train run from the checkpoint Tune gave this
    trial (its own latest, or a donor's after an exploit), each ending in a report with its checkpoint."""
    from ray import tune

    from jobs.trainer import build_trainer
    from workers.checkpoint import read_meta

    given = tune.get_checkpoint()
    init = given.path if given is not None else None
    start = read_meta(Path(init))["step"] if init else 0
    while start < spec.train.steps:
        end = min(start + interval, spec.train.steps)
        loop = functools.partial(_segment_loop, init_checkpoint=init, stop_at_step=end)
        result = build_trainer(spec, data, trial_out, run_name=f"segment-{end:08d}-{uuid.uuid4().hex[:6]}",
                               train_loop=loop).fit()
        init = result.checkpoint.path
        start = read_meta(Path(init))["step"]  # before ``end`` when the trial was asked to stop
        tune.report(trial_metrics(result.metrics), checkpoint=tune.Checkpoint.from_directory(init))
        if start < end:
            return


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], data: Any, out: str, s3: dict[str, str]) -> None:
    """One trial: the base train spec with this trial's values on ``data`` (workers.data.TrainingData,
    opened once by the driver), as a Ray Train run in
    ``out/trials/<trial id>`` (a stable run name, so a restarted trial resumes its checkpoints).

    ``s3``: the driver's S3 settings (workers.data.s3_env). build_trainer runs here, in the trial's
    actor, whose environment is its node's rather than the driver's, and hands the S3 settings it
    finds to the run's workers and Ray Data tasks: set the driver's, as jobs.train hands its own."""
    from ray import tune

    from jobs.trainer import build_trainer

    os.environ.update(s3)
    swept = SweepSpec.model_validate(sweep)
    spec = swept.trial_spec(config["params"])
    trial_id = tune.get_context().get_trial_id()
    trial_out = Path(out) / "trials" / trial_id
    ended = threading.Event()
    threading.Thread(target=_relay_stop, args=(Path(out), trial_id, trial_out, ended, _tune_stopping()),
                     daemon=True).start()
    try:
        if isinstance(swept.scheduler, PbtScheduler):
            _run_segments(spec, data, trial_out, swept.scheduler.perturbation_interval)
        else:
            _with_callbacks(build_trainer(spec, data, trial_out, run_name=TRIAL_RUN), [_trial_report()]).fit()
    finally:
        ended.set()


def _tune_stopping() -> Any:
    """Whether Tune has stopped this trial (its scheduler, e.g. ASHA, or the stopper): the trial's
    function session's stop event, which the trial actor's stop() sets (ray/train/_internal/session.py,
    Ray 2.60; a Ray without it: never). Tune frees the trial's slot at once and starts the next trial,
    while this actor, the Train run it owns and that run's workers go only when Ray collects the actor."""
    from ray.train._internal.session import get_session

    event = getattr(get_session(), "stop_event", None)
    return event.is_set if event is not None else (lambda: False)


def _relay_stop(out: Path, trial_id: str, trial_out: Path, ended: threading.Event, tune_stopping: Any) -> None:
    """End this trial's training run when it is asked to stop, or Tune stops it: the loop checkpoints
    at the end of its current step, then the run ends and frees its CPUs. The driver's stopper acts
    only on the reports Tune has taken in, which trail the loop (Ray Train forwards them when its
    controller polls), so a short trial could otherwise finish before its stop took effect."""
    from workers.control import ControlChannel

    while not ended.wait(STOP_POLL_S):
        why = ("the trial was asked to stop" if stop_requested(out, trial_id)
               else "Tune stopped the trial" if tune_stopping() else None)
        if why is not None:
            ControlChannel(trial_out).request_checkpoint(why, stop=True)
            return


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
