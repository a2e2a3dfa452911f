"""A sweep spec's Ray Tune experiment: the Tuner, its search, trial scheduler, stop requests and the
trial events feed (jobs/contracts/sweep_events.py), for ``python -m jobs.sweep`` and the tests.

Each trial is ``run_trial`` (jobs/runtime/sweep_trial.py), in its Tune actor or as a Ray Train run;
the driver's Tuner only schedules the trials, records their events and stops the ones asked to stop. A Tuner made on a
folder that holds the experiment restores it (``Tuner.restore``): finished trials stay, interrupted
ones continue from their latest checkpoint.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

from optuna.samplers import TPESampler
from ray import tune
from ray.tune import Callback, Stopper
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from jobs.contracts.sweep_events import ERROR_MAX_CHARS, TrialState, append_event, stop_requested
from jobs.specs.sweep import (
    MODEL_BASED_SEARCHES,
    AshaScheduler,
    Choice,
    LogUniform,
    PbtScheduler,
    RandInt,
    SweepSpec,
)
from workers.device import worker_resources

EXPERIMENT = "tune"  # Tune's experiment folder inside --out; fixed so a rerun finds it
# Restarts of a failed trial (of one in its actor, or of one whose Train run failed as a whole: its
# workers' own restarts are the base spec's resources.max_failures): it resumes from its latest checkpoint.
TRIAL_RETRIES = 2
# Logical CPUs the Tune actor of a trial that is a Train run reserves: it only waits on the run, whose
# workers reserve their own (Tune refuses an empty request, so a token amount).
TRIAL_DRIVER_CPUS = 0.01
# The libraries' own numbers of random trials before TPE models the results (_startup_trials).
OPTUNA_STARTUP_TRIALS, HYPEROPT_STARTUP_TRIALS = 10, 20


def _log(msg: str) -> None:
    print(msg, flush=True)


def _dimension(dim: Any, grid: bool) -> Any:
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
        return OptunaSearch(sampler=TPESampler(seed=spec.base.seed,
                                               n_startup_trials=_startup_trials(spec, OPTUNA_STARTUP_TRIALS)))
    if spec.search == "hyperopt":
        # deferred: hyperopt takes ~1.3 s to import, paid only by a sweep that searches with it
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=spec.base.seed,
                              n_initial_points=_startup_trials(spec, HYPEROPT_STARTUP_TRIALS))
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
    """The trial events feed (jobs/contracts/sweep_events.py) and one log line per event."""
    total, metric = spec.base.train.steps, spec.metric

    class TrialEvents(Callback):
        def __init__(self) -> None:
            self.paused: set[str] = set()  # trials reported paused and not started since

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.paused.discard(trial.trial_id)
            append_event(out, "start", trial.trial_id, parameters=trial.config["params"])
            _log(f"trial {trial.trial_id}: started {trial.config['params']}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            keep = {k: result[k] for k in ("step", "loss", "eval_loss", "tokens_per_s", "wire_bytes", "compression")
                    if result.get(k) is not None}
            checkpoint = result.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else None)
            append_event(out, "result", trial.trial_id, metrics={**keep, "checkpoint": checkpoint})
            value = result.get(metric)
            _log(f"trial {trial.trial_id}: step {keep.get('step')}/{total} {metric} "
                 + (f"{value:.4f}" if isinstance(value, float) else "n/a"))

        def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
            # A checkpoint reported to Tune (a PBT segment's) is registered after on_trial_result has
            # run for its report, whose event names the one before.
            append_event(out, "checkpoint", trial.trial_id, path=checkpoint.path)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            # Tune has no callback for a pause (PBT between segments): a trial seen PAUSED after a
            # step is one; its next start (on_trial_start) makes it RUNNING again.
            for trial in trials:
                if trial.status == "PAUSED" and trial.trial_id not in self.paused:
                    self.paused.add(trial.trial_id)
                    append_event(out, "pause", trial.trial_id)
                    _log(f"trial {trial.trial_id}: paused")

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
    class StopRequests(Stopper):
        """Stops a trial at its next report once ``control/trials/<id>.stop`` exists."""

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return stop_requested(out, trial_id)

        def stop_all(self) -> bool:
            return False

    return StopRequests()


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What a trial's Tune actor reserves: a training worker's resources when the trial trains in it
    (``trials_in_actor``), else next to nothing (its Train run reserves its workers)."""
    res = spec.base.resources
    return worker_resources(res.device, res.cpus_per_worker) if spec.trials_in_actor else {"CPU": TRIAL_DRIVER_CPUS}


class SweepStateError(RuntimeError):
    """An experiment in the output folder that this code cannot resume."""


def make_tuner(spec: SweepSpec, trainable: Any, out: Path) -> Any:
    """The Tuner for ``spec`` running ``trainable`` (run_trial, or a scripted stand-in in tests),
    restored when ``out`` already holds the experiment."""
    trainable = tune.with_resources(trainable, trial_resources(spec))
    if spec.metric == "eval_loss":  # known only at a trial's end: the other reports lack it
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    experiment = out / EXPERIMENT
    if tune.Tuner.can_restore(experiment):
        _log(f"sweep: resuming the experiment in {experiment}")
        try:
            return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
        except (ImportError, AttributeError, pickle.UnpicklingError, EOFError) as e:  # Tune pickles its state
            raise SweepStateError(f"the sweep in {experiment} cannot be resumed: its saved state was written by "
                                  f"another version of this code or is damaged ({type(e).__name__}: {e}); "
                                  "give a new --out, or delete that folder to start over") from e
    return tune.Tuner(
        trainable, param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=_search(spec), scheduler=_scheduler(spec),
            num_samples=1 if spec.search == "grid" else spec.n_trials,
            max_concurrent_trials=spec.max_concurrent if spec.search in MODEL_BASED_SEARCHES else None,
            # A trial in its actor ends with its function (a stopped one at its parked report, which
            # Tune ends before reusing the actor), so the next trial takes the warm actor, torch
            # imported. A trial that is a Train run ends only with its actor (docs/sweeps.md).
            reuse_actors=spec.trials_in_actor),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=str(out), stop=_stopper(out), verbose=0, callbacks=_callbacks(spec, out),
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES)),
    )
