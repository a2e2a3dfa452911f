"""The sweep driver's Tune wiring with scripted trials (no training): ASHA stops the trials whose
scripted curve is worse at a rung, the stop-request stopper ends a trial at its next report, a stop
reaches the trial's training loop (jobs/runtime/sweep_trial.py), the events callback records what happened, and the Optuna and HyperOpt searches stay inside the space
(jobs/runtime/tuner.py, jobs/runtime/sweep_trial.py, jobs/contracts/sweep_events.py). About 40 s on 2 cores."""

from __future__ import annotations

import pytest

from jobs.contracts.sweep_events import SUMMARY_FILE, TrialState, read_events, read_sweep, request_stop
from jobs.runtime.tuner import make_tuner
from jobs.specs.sweep import SweepSpec

STEPS, EVERY = 20, 5
# train.lr (as a label) -> the loss the scripted trial reports at each of its reports.
CURVES = {0.001: [3.0, 2.5, 2.0, 1.5], 0.002: [4.0, 3.9, 3.8, 3.7], 0.003: [5.0, 4.9, 4.8, 4.7]}


def _spec(scheduler: dict, lrs: list[float]) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "scripted", "search": "grid", "max_concurrent": 1, "report_every": EVERY, "scheduler": scheduler,
        "space": {"train.lr": {"type": "choice", "values": lrs}},
        "base": {"train": {"steps": STEPS}, "resources": {"num_workers": 1}},
    })


def scripted_trial(config: dict) -> None:
    """Reports CURVES[lr] at steps 5, 10, 15, 20, as a trial's _TrialReport would."""
    from ray import tune

    for i, loss in enumerate(CURVES[config["params"]["train.lr"]]):
        tune.report({"step": (i + 1) * EVERY, "loss": loss})


def stopping_trial(config: dict, *, out: str) -> None:
    """Asks for its own stop after its first report (as `orch stop-trial` would), then keeps reporting."""
    from pathlib import Path

    from ray import tune

    for i, loss in enumerate(CURVES[config["params"]["train.lr"]]):
        tune.report({"step": (i + 1) * EVERY, "loss": loss})
        if i == 0:
            request_stop(Path(out), tune.get_context().get_trial_id(), "test")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_asha_stops_the_trials_that_are_worse_at_the_first_rung(local_ray, tmp_path):
    spec = _spec({"type": "asha", "grace_period": EVERY, "reduction_factor": 2}, list(CURVES))
    make_tuner(spec, scripted_trial, tmp_path).fit()
    view = read_sweep(tmp_path, metric="loss", mode="min", total_steps=STEPS)
    by_lr = {t.parameters["train.lr"]: t for t in view.trials}
    assert by_lr[0.001].state is TrialState.SUCCEEDED and by_lr[0.001].step == STEPS
    stopped = [t for t in view.trials if t.state is TrialState.EARLY_STOPPED]
    assert stopped and all(t.step < STEPS for t in stopped)
    assert view.best.trial_id == by_lr[0.001].id and view.best.value == 1.5
    assert [p["loss"] for p in by_lr[0.001].history] == CURVES[0.001]
    assert not (tmp_path / SUMMARY_FILE).exists()  # the summary is the driver's (main), not the tuner's


@pytest.mark.ray
def test_a_stop_request_ends_that_trial_at_its_next_report(local_ray, tmp_path):
    from ray import tune

    spec = _spec({"type": "fifo"}, [0.001])
    make_tuner(spec, tune.with_parameters(stopping_trial, out=str(tmp_path)), tmp_path).fit()
    [trial] = read_sweep(tmp_path, metric="loss", mode="min", total_steps=STEPS).trials
    assert trial.state is TrialState.STOPPED and trial.stop_requested
    assert trial.step < STEPS
    kinds = [e["event"] for e in read_events(tmp_path)]
    assert kinds[0] == "start" and kinds[-1] == "complete"


def bowl_trial(config: dict) -> None:
    """A loss with its minimum at lr = 10**-2.5, the same at every report."""
    import math

    from ray import tune

    for step in range(EVERY, STEPS + 1, EVERY):
        tune.report({"step": step, "loss": (math.log10(config["params"]["train.lr"]) + 2.5) ** 2})


@pytest.mark.ray
@pytest.mark.parametrize("search", ["optuna", "hyperopt"])
def test_a_model_based_search_samples_the_space(local_ray, tmp_path, search):
    """Values of every dimension type come back as the spec's values (a choice's value, not its index;
    randint's high inclusive), each trial distinct, with the sweep's concurrency limit in force."""
    spec = SweepSpec.model_validate({
        "search": search, "trials": 4, "max_concurrent": 2, "report_every": EVERY,
        "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                  "compression.density": {"type": "choice", "values": [0.01, 0.1]},
                  "seed": {"type": "randint", "low": 0, "high": 1}},
        "base": {"train": {"steps": STEPS}, "resources": {"num_workers": 1}},
    })
    make_tuner(spec, bowl_trial, tmp_path).fit()
    view = read_sweep(tmp_path, metric="loss", mode="min", total_steps=STEPS)
    lrs = {t.parameters["train.lr"] for t in view.trials}
    assert len(lrs) == 4 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert all(t.parameters["compression.density"] in (0.01, 0.1) for t in view.trials)
    assert all(t.parameters["seed"] in (0, 1) for t in view.trials)
    assert all(t.state is TrialState.SUCCEEDED for t in view.trials)
    running, most = 0, 0
    for event in read_events(tmp_path):
        running += {"start": 1, "complete": -1}.get(event["event"], 0)
        most = max(most, running)
    assert most <= spec.max_concurrent


def test_a_stop_reaches_the_trials_training_loop(tmp_path):
    """_relay_stop, on its own: a stop request file becomes a "checkpoint and end" request in the
    trial's control folder (workers/control.py), which its loop answers at the end of its current
    step; nothing is asked before, or once the trial has ended."""
    import threading

    from jobs.runtime.sweep_trial import _relay_stop
    from workers.control import ControlChannel

    def relay(trial: str) -> tuple[threading.Thread, threading.Event, ControlChannel]:
        ended = threading.Event()
        t = threading.Thread(target=_relay_stop, args=(tmp_path, trial, tmp_path / trial, ended))
        t.start()
        return t, ended, ControlChannel(tmp_path / trial)

    asked, ended, channel = relay("t1")
    assert channel.pending() is None
    request_stop(tmp_path, "t1", "test")
    asked.join(timeout=10)
    assert not asked.is_alive() and channel.pending().stop and "asked to stop" in channel.pending().reason

    asked, ended, channel = relay("t2")
    ended.set()  # the trial's run ended on its own
    asked.join(timeout=10)
    request_stop(tmp_path, "t2", "too late")
    assert not asked.is_alive() and channel.pending() is None
