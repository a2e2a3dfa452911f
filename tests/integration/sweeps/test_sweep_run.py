"""A real sweep (tests/support/sweeps.py: 3 trials of real training, one stopped on request, the driver killed
mid-sweep and rerun) seen from its files, the API and the CLI. The shared run takes about 2.5-3
minutes on 2 busy cores; the tests on top of it about 2 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from jobs.contracts.sweep_events import STOP_DIR, SUMMARY_FILE, TrialState, append_event, read_events
from orchestrator import cli
from orchestrator.api.app import create_app
from orchestrator.controller.entrypoints import job_paths
from orchestrator.settings import Settings
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer
from tests.support.sweeps import SPEC, STEPS, TRIALS, attach
from workers.waiting import wait_until

# The fixture `real_sweep`, registered as a plugin: one run per session, shared with the dashboard's
# browser tests (a fixture imported into two modules would be two fixtures, and two runs).
pytest_plugins = ["tests.support.sweeps"]

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.ray
def test_the_summary_holds_every_trial_and_the_best(real_sweep):
    s = real_sweep.summary
    states = {t["id"]: t["state"] for t in s["trials"]}
    assert len(states) == TRIALS and states[real_sweep.stopped_trial] == "STOPPED"
    assert [st for tid, st in states.items() if tid != real_sweep.stopped_trial] == ["SUCCEEDED"] * (TRIALS - 1)
    assert s["best"]["value"] == min(t["last_metric"] for t in s["trials"])
    assert (Path(s["best"]["checkpoint"]) / "meta.json").exists()  # a checkpoint jobs.serve can load
    for t in s["trials"]:
        assert t["history"] and all(p["loss"] > 0 for p in t["history"])
        assert set(t["parameters"]) == {"train.lr", "compression.density"}
        assert t["compression"] >= 1.0  # dense bytes / bytes sent, from every report


@pytest.mark.ray
def test_the_stopped_trial_ended_before_its_last_step(real_sweep):
    [stopped] = [t for t in real_sweep.summary["trials"] if t["id"] == real_sweep.stopped_trial]
    assert stopped["step"] < STEPS and stopped["stop_requested"]


@pytest.mark.ray
def test_a_killed_driver_resumes_on_the_same_command(real_sweep):
    assert real_sweep.first_rc != 0  # SIGKILLed mid-sweep
    assert "resuming the experiment" in real_sweep.resume.stdout
    events = read_events(real_sweep.out)
    resumed = [e for e in events[len(real_sweep.events_at_kill):] if e["trial"] == real_sweep.resumed_trial]
    assert resumed[0]["event"] == "start"  # Tune restarted the interrupted trial...
    first = next(e for e in resumed if e["event"] == "result")
    before = max(e["metrics"]["step"] for e in real_sweep.events_at_kill
                 if e["trial"] == real_sweep.resumed_trial and e["event"] == "result")
    assert first["metrics"]["step"] > before  # ...from its checkpoint, not from step 0
    assert sum(e["event"] == "complete" for e in events) >= TRIALS


@pytest.fixture
def service(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=None)
    ray = FakeRay(auto_run=True)
    ray.reachable = False  # sweeps stay QUEUED: the run's files stand for a driver's
    app = create_app(settings, ray=ray)
    with TestClient(app) as client:
        yield settings, client
    app.state.store.close()


def _submit(client, headers=AUTH) -> str:
    r = client.post("/v1/sweeps", json={"spec": yaml.safe_load(SPEC.read_text())}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.ray
def test_the_api_shows_the_trials_of_a_sweep(real_sweep, service):
    settings, client = service
    sweep_id = _submit(client)
    attach(real_sweep, job_paths(settings.job_root, sweep_id).out)
    s = client.get(f"/v1/sweeps/{sweep_id}", headers=AUTH).json()
    assert s["counts"] == {"STOPPED": 1, "SUCCEEDED": TRIALS - 1} and s["trials_total"] == 2  # the spec as posted
    assert s["best"] == {k: real_sweep.summary["best"][k] for k in s["best"]}
    trial = next(t for t in s["trials"] if t["id"] == real_sweep.stopped_trial)
    assert trial["state"] == "STOPPED" and trial["history"][-1]["step"] == trial["step"] < STEPS
    r = client.post(f"/v1/sweeps/{sweep_id}/trials/{trial['id']}/stop", headers=AUTH)
    assert r.status_code == 409 and "already STOPPED" in r.json()["detail"]
    listed = client.get("/v1/sweeps", headers=AUTH).json()
    assert listed["count"] == 1 and listed["data"][0]["best"]["trial_id"] == s["best"]["trial_id"]
    assert client.get(f"/v1/jobs/{sweep_id}", headers=AUTH).json()["kind"] == "sweep"


@pytest.mark.ray
def test_the_cli_shows_the_trials(real_sweep, tmp_path, monkeypatch, capsys):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=None)
    ray = FakeRay(auto_run=True)
    ray.reachable = False
    app = create_app(settings, ray=ray)
    try:
        with BackgroundServer(app) as url:
            monkeypatch.setenv("ORCH_URL", url)
            monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
            assert cli.main(["sweep", str(SPEC), "--json"]) == 0
            sweep_id = json.loads(capsys.readouterr().out)["id"]
            attach(real_sweep, job_paths(settings.job_root, sweep_id).out)
            assert cli.main(["trials", sweep_id]) == 0
            table = capsys.readouterr().out
            assert cli.main(["trials", sweep_id, "--json"]) == 0
            data = json.loads(capsys.readouterr().out)
            assert cli.main(["stop-trial", sweep_id, real_sweep.stopped_trial]) == 1  # already STOPPED: 409
    finally:
        app.state.store.close()
    assert any(real_sweep.stopped_trial in line and "STOPPED" in line for line in table.splitlines())
    assert "best:" in table
    assert {t["id"] for t in data["trials"]} == {t["id"] for t in real_sweep.summary["trials"]}


def test_stop_a_running_trial_and_cancel_the_sweep(service):
    settings, client = service
    sweep_id = _submit(client)
    out = job_paths(settings.job_root, sweep_id).out
    out.mkdir(parents=True, exist_ok=True)
    append_event(out, "start", "t_1", parameters={"train.lr": 0.001})
    assert client.post(f"/v1/sweeps/{sweep_id}/trials/nope/stop", headers=AUTH).status_code == 404
    r = client.post(f"/v1/sweeps/{sweep_id}/trials/t_1/stop", headers=AUTH)
    assert r.status_code == 202 and (out / STOP_DIR / "t_1.stop").exists()
    assert client.get(f"/v1/sweeps/{sweep_id}", headers=AUTH).json()["trials"][0]["stop_requested"]
    assert client.post(f"/v1/sweeps/{sweep_id}/cancel", headers=AUTH).status_code == 202
    wait_until(lambda: client.get(f"/v1/sweeps/{sweep_id}", headers=AUTH).json()["state"] == "CANCELLED",
               timeout_s=30, interval_s=0.1, what="the controller to cancel the sweep")
    s = client.get(f"/v1/sweeps/{sweep_id}", headers=AUTH).json()
    assert s["trials"][0]["state"] == TrialState.STOPPED.value  # its driver is gone
    assert client.post(f"/v1/sweeps/{sweep_id}/trials/t_1/stop", headers=AUTH).status_code == 409
    assert not (out / SUMMARY_FILE).exists()


def test_another_teams_sweep_is_404_and_a_train_job_is_not_a_sweep(service):
    settings, client = service
    tokens = {}
    for user, team in (("alice", "nlp"), ("carol", "cv")):
        r = client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH)
        tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
    sweep_id = _submit(client, tokens["carol"])
    for method, path in (("GET", ""), ("POST", "/cancel"), ("POST", "/trials/t_1/stop")):
        assert client.request(method, f"/v1/sweeps/{sweep_id}{path}", headers=tokens["alice"]).status_code == 404
    assert client.get("/v1/sweeps", headers=tokens["alice"]).json()["count"] == 0
    assert client.get(f"/v1/sweeps/{sweep_id}", headers=tokens["carol"]).status_code == 200
    train = client.post("/v1/jobs", json={"spec": {"name": "t"}}, headers=AUTH).json()["id"]
    assert client.get(f"/v1/sweeps/{train}", headers=AUTH).status_code == 404
