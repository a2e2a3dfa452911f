"""SweepSpec validation (jobs/specs/sweep.py) and the events fold (jobs/contracts/sweep_events.py): no Ray.
Under 2 s."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.contracts.sweep_events import (
    TrialState,
    append_event,
    fold,
    read_events,
    request_stop,
    trial_metrics,
)
from jobs.specs.base import SpecError
from jobs.specs.sweep import load_sweep_spec, validate_sweep_spec

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = [ROOT / "jobs" / "examples" / "sweep.yaml", ROOT / "jobs" / "examples" / "sweep-demo.yaml",
            ROOT / "jobs" / "examples" / "sweep-local.yaml"]
BASE = {"train": {"steps": 40}, "model": {"n_routed_experts": 8}}
SPACE = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}


def _raw(**fields) -> dict:
    return {"space": copy.deepcopy(SPACE), "base": copy.deepcopy(BASE), **fields}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_validate(path):
    spec = load_sweep_spec(path)
    assert spec.n_trials >= 2 and spec.space


@pytest.mark.parametrize(("space", "named"), [
    ({"train.lrr": {"type": "uniform", "low": 0.1, "high": 1}}, "train.lrr is not a field of train"),
    ({"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 1}}, "optimizer is not a field"),
    ({"train": {"type": "choice", "values": [1]}}, "train is a section"),
    ({"train.lr": {"type": "uniform", "low": 0.1, "high": 20}}, "space.train.lr: the value 20.0"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}, "space.train.lr.loguniform.low"),
    ({"train.lr": {"type": "uniform", "low": 2, "high": 1}}, "low (2.0) must be < high (1.0)"),
    ({"model.top_k": {"type": "randint", "low": 1, "high": 9}}, "space.model.top_k: the value 9"),
    ({"model.n_routed_experts": {"type": "uniform", "low": 4, "high": 8}}, "an integer field; use randint"),
    ({"model.n_heads": {"type": "choice", "values": [4, 5]}}, "space.model.n_heads: the value 5"),
    ({"resources.num_workers": {"type": "choice", "values": [1, 2]}}, "may not vary resources"),
    ({"data.source": {"type": "choice", "values": ["/x"]}}, "may not vary data"),
    ({"checkpoint_storage": {"type": "choice", "values": ["/x"]}}, "may not vary checkpoint_storage (trials"),
])
def test_a_bad_path_or_range_is_an_error_naming_it(space, named):
    with pytest.raises(SpecError) as e:
        validate_sweep_spec(_raw(space=space))
    assert named in str(e.value)


def test_a_base_with_its_own_checkpoint_storage_is_refused():
    raw = _raw()
    raw["base"] = {**raw["base"], "checkpoint_storage": "s3://bucket/runs"}
    with pytest.raises(SpecError, match="base: .*checkpoint_storage: trials keep their checkpoints in the sweep.s output"):
        validate_sweep_spec(raw)


def test_pbt_may_only_mutate_fields_that_keep_parameter_shapes():
    pbt = {"type": "pbt", "perturbation_interval": 10}
    ok = validate_sweep_spec(_raw(scheduler=pbt, space={**SPACE, "compression.density": {
        "type": "uniform", "low": 0.01, "high": 0.5}}))
    assert ok.scheduler.type == "pbt"
    with pytest.raises(SpecError, match=r"space\.model\.n_routed_experts: PBT"):
        validate_sweep_spec(_raw(scheduler=pbt, space={**SPACE, "model.n_routed_experts": {
            "type": "choice", "values": [4, 8]}}))
    with pytest.raises(SpecError, match="perturbation_interval .* multiple of report_every"):
        validate_sweep_spec(_raw(scheduler={**pbt, "perturbation_interval": 7}))


@pytest.mark.parametrize("search", ["optuna", "hyperopt"])
def test_a_model_based_search_takes_any_space_and_scheduler_but_pbt(search):
    spec = validate_sweep_spec(_raw(search=search, scheduler={"type": "asha", "grace_period": 10}, space={
        **SPACE, "model.n_routed_experts": {"type": "choice", "values": [4, 8]}}))
    assert (spec.search, spec.n_trials) == (search, 8)
    with pytest.raises(SpecError, match=f"search {search} chooses each trial's values .* use search random or grid"):
        validate_sweep_spec(_raw(search=search, scheduler={"type": "pbt", "perturbation_interval": 10}))
    with pytest.raises(SpecError, match="search: Input should be 'random', 'grid', 'optuna' or 'hyperopt'"):
        validate_sweep_spec(_raw(search="hyperopt-tpe"))


def test_metric_scheduler_grid_and_base_rules():
    with pytest.raises(SpecError, match="eval_loss is known only when a trial ends"):
        validate_sweep_spec(_raw(metric="eval_loss", scheduler={"type": "asha"}))
    with pytest.raises(SpecError, match="grid search needs every dimension to be a choice"):
        validate_sweep_spec(_raw(search="grid"))
    grid = {"train.lr": {"type": "choice", "values": [1e-3, 3e-3]}, "seed": {"type": "choice", "values": [0, 1, 2]}}
    assert validate_sweep_spec(_raw(search="grid", space=grid)).n_trials == 6
    with pytest.raises(SpecError, match=r"trials \(5\) must be the grid's size \(6\)"):
        validate_sweep_spec(_raw(search="grid", space=grid, trials=5))
    # The base as trials run it: expert_parallel 2 cannot divide one worker per trial.
    with pytest.raises(SpecError, match=r"base: .*expert_parallel \(2\) must divide resources.num_workers \(1\)"):
        validate_sweep_spec(_raw(base={**BASE, "resources": {"num_workers": 2, "expert_parallel": 2}}))


def test_a_trial_spec_is_the_base_with_the_sweeps_placement_and_its_values():
    spec = validate_sweep_spec(_raw(workers_per_trial=2, report_every=5))
    trial = spec.trial_spec({"train.lr": 0.002})
    assert (trial.train.lr, trial.resources.num_workers, trial.train.checkpoint_every) == (0.002, 2, 5)
    assert trial.train.steps == 40 and spec.base.train.lr != 0.002


def test_invalid_sweep_spec_exits_2_naming_the_path_before_any_ray_work(tmp_path):
    raw = yaml.safe_load(EXAMPLES[1].read_text())
    raw["space"]["train.lr"]["high"] = 50
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "jobs.sweep", "--spec", str(bad)], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and "space.train.lr: the value 50" in r.stderr and "Traceback" not in r.stderr
    assert "ray" not in r.stdout.lower()


def test_events_fold_into_trials_with_a_bounded_history(tmp_path):
    append_event(tmp_path, "start", "t1", parameters={"train.lr": 0.1})
    for step in range(1, 301):
        append_event(tmp_path, "result", "t1", metrics={"step": step, "loss": 10 - step / 100, "checkpoint": f"c{step}"})
    append_event(tmp_path, "start", "t2", parameters={"train.lr": 0.2})
    append_event(tmp_path, "result", "t2", metrics={"step": 1, "loss": 5.0})
    append_event(tmp_path, "error", "t2", state="FAILED", error="boom")
    with open(tmp_path / "trials.jsonl", "a") as f:
        f.write('{"event": "result", "trial": "t1", "metr')  # a killed writer's torn line
    request_stop(tmp_path, "t1", "test")
    view = fold(read_events(tmp_path), out=tmp_path, metric="loss", mode="min", total_steps=300,
                history_max_points=50)
    t1, t2 = view.trials
    assert (t1.state, t1.step, t1.iteration, t1.checkpoint) == (TrialState.RUNNING, 300, 300, "c300")
    assert len(t1.history) == 50 and t1.history[0]["step"] == 1 and t1.history[-1]["step"] == 300
    assert t1.stop_requested and t1.best_metric == pytest.approx(7.0)
    assert (t2.state, t2.error) == (TrialState.FAILED, "boom")
    assert view.best.trial_id == "t1" and view.counts == {TrialState.RUNNING: 1, TrialState.FAILED: 1}


def test_a_trial_shows_the_byte_saving_of_its_latest_report(tmp_path):
    append_event(tmp_path, "start", "t1", parameters={})
    report = trial_metrics({"step": 48, "loss": 2.5, "wire_bytes": 2_000, "dense_bytes": 500_000, "compression": 250.0})
    assert report == {"step": 48, "loss": 2.5, "wire_bytes": 2000, "compression": 250.0}
    append_event(tmp_path, "result", "t1", metrics=report)
    append_event(tmp_path, "result", "t1", metrics={"step": 96, "loss": 2.0})  # a report without bytes keeps it
    [t1] = fold(read_events(tmp_path), out=tmp_path, metric="loss", mode="min", total_steps=96).trials
    assert (t1.compression, t1.step) == (250.0, 96)


def test_a_checkpoint_event_names_the_trials_newest_checkpoint(tmp_path):
    """Tune registers a checkpoint reported to it (a PBT segment's) after the result event of its
    report, which names the one before: the checkpoint event that follows sets the newest."""
    append_event(tmp_path, "start", "t1", parameters={})
    append_event(tmp_path, "result", "t1", metrics={"step": 10, "loss": 2.0, "checkpoint": "c0"})
    append_event(tmp_path, "checkpoint", "t1", path="c10")
    [t1] = fold(read_events(tmp_path), out=tmp_path, metric="loss", mode="min", total_steps=20).trials
    assert (t1.checkpoint, t1.step, t1.iteration) == ("c10", 10, 1)


def test_a_pbt_pause_shows_as_paused_until_the_trial_starts_again(tmp_path):
    """Tune has no pause callback; the events callback reports a trial it sees PAUSED after a step
    once, and the trial's next start makes it RUNNING again."""
    from types import SimpleNamespace

    from jobs.runtime.tuner import _callbacks

    [events] = _callbacks(validate_sweep_spec(_raw()), tmp_path)
    trial = SimpleNamespace(trial_id="t1", status="RUNNING", config={"params": {"train.lr": 1e-3}})
    view = lambda: fold(read_events(tmp_path), out=tmp_path, metric="loss", mode="min", total_steps=40).trials[0]  # noqa: E731
    events.on_trial_start(iteration=1, trials=[trial], trial=trial)
    events.on_step_end(iteration=2, trials=[trial])
    assert view().state == TrialState.RUNNING
    trial.status = "PAUSED"
    events.on_step_end(iteration=3, trials=[trial])
    events.on_step_end(iteration=4, trials=[trial])
    assert view().state == TrialState.PAUSED and len(read_events(tmp_path)) == 2  # reported once
    trial.status = "RUNNING"
    events.on_trial_start(iteration=5, trials=[trial], trial=trial)
    assert view().state == TrialState.RUNNING


@pytest.mark.parametrize(("fields", "in_actor"), [
    ({}, True),
    ({"workers_per_trial": 2}, False),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 20}, "report_every": 10}, False),
])
def test_one_worker_trials_train_in_their_tune_actor_reserving_a_workers_resources(fields, in_actor):
    from jobs.runtime.tuner import TRIAL_DRIVER_CPUS, trial_resources

    spec = validate_sweep_spec(_raw(**fields))
    assert spec.trials_in_actor is in_actor
    assert trial_resources(spec) == ({"CPU": spec.base.resources.cpus_per_worker} if in_actor
                                     else {"CPU": TRIAL_DRIVER_CPUS})


@pytest.mark.parametrize("saved", [b"cjobs.sweep_events\nTrialView\n.", b"\x80\x05not a pickle"])
def test_a_sweep_state_from_another_version_is_refused_saying_what_to_do(tmp_path, saved):
    """Tune pickles its experiment state: one written before a module moved (jobs.sweep_events is
    jobs/contracts/sweep_events.py now) raised a bare ModuleNotFoundError from deep in Tune."""
    from jobs.runtime.tuner import EXPERIMENT, SweepStateError, make_tuner

    (tmp_path / EXPERIMENT).mkdir()
    (tmp_path / EXPERIMENT / "tuner.pkl").write_bytes(saved)
    with pytest.raises(SweepStateError, match="cannot be resumed.*new --out"):
        make_tuner(validate_sweep_spec(_raw()), lambda config: None, tmp_path)
