"""`orch` through its one client (orchestrator/cli/client.py): a wait is bounded and says what it
waited for, and an unreachable API is one clear line on every kind of request, a log stream included."""

from __future__ import annotations

import json

import pytest

from jobs.contracts.sweep_events import append_event
from orchestrator import cli
from orchestrator.api.app import create_app
from orchestrator.cli import sweeps as sweeps_cli
from orchestrator.cli.client import OrchClient
from orchestrator.controller.entrypoints import job_paths
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store.records import submission_id_for
from tests.support.control_plane import TOKEN
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer

UNREACHABLE_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there
SWEEP_SPEC = {"name": "sw", "metric": "loss", "mode": "min", "trials": 2,
              "space": {"train.lr": {"type": "choice", "values": [0.001, 0.002]}},
              "base": {"name": "b", "train": {"steps": 20}}}


@pytest.fixture
def ray() -> FakeRay:
    return FakeRay()


@pytest.fixture
def api(tmp_path, monkeypatch, ray):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.05,
                        metrics_interval_s=0.05, follow_max_s=5.0, ray_address=None)
    app = create_app(settings, ray=ray)
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        yield app
    app.state.store.close()


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": 10, "model": {}}))
    return path


def test_serve_wait_gives_up_after_its_timeout_and_names_the_deployment_and_its_status(api, tmp_path, capsys):
    """Serve never runs this one (no Ray): `--wait` used to poll forever."""
    code = cli.main(["serve", str(_checkpoint(tmp_path / "c")), "--name", "m", "--set", "num_cpus=0",
                     "--wait", "--timeout", "0.5", "--json"])
    err = capsys.readouterr().err
    [d] = api.state.store.deployments.list()[0]
    assert code == 1, err
    assert f"error: waited 0.5 s for deployment {d.id} to run; it is {d.status.value}" in err
    assert f"it goes on: orch deployments show {d.id}" in err


@pytest.mark.parametrize("argv", [["status", "j1"], ["logs", "j1", "--follow"], ["trials", "s1", "--follow"],
                                  ["token", "list"], ["deployments"]])
def test_an_unreachable_api_is_one_line_for_every_request(argv, monkeypatch, capsys):
    monkeypatch.setenv("ORCH_URL", UNREACHABLE_URL)
    monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the API at {UNREACHABLE_URL}") and "Traceback" not in err


def test_trials_follow_prints_each_change_until_the_sweep_ends(api, ray, capsys, monkeypatch):
    store = api.state.store
    job, _ = store.jobs.create(kind="sweep", name="sw", spec=SWEEP_SPEC, max_retries=0, team="nlp", owner="alice")
    for state in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING):
        store.jobs.transition(job.id, state, "test", new_attempt=state is JobState.STARTING)
    ray.set(submission_id_for(job.id, 1), "RUNNING")  # the controller sees it run, and leaves it
    out = job_paths(api.state.settings.job_root, job.id).out
    out.mkdir(parents=True, exist_ok=True)
    append_event(out, "start", "t1", parameters={"train.lr": 0.001})

    read = OrchClient.sweep

    def read_then_finish(self: OrchClient, sweep_id: str) -> dict:
        """The sweep ends once the CLI has seen it run."""
        answer = read(self, sweep_id)
        if answer["state"] == "RUNNING":
            append_event(out, "result", "t1", metrics={"step": 20, "loss": 1.5})
            append_event(out, "complete", "t1", state="SUCCEEDED")
            store.jobs.transition(job.id, JobState.SUCCEEDED, "test")
        return answer

    monkeypatch.setattr(OrchClient, "sweep", read_then_finish)
    monkeypatch.setattr(sweeps_cli, "FOLLOW_POLL_S", 0.05)
    code = cli.main(["trials", job.id, "--follow"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("trial t1: RUNNING step 0/20")
    assert any(line.startswith("trial t1: SUCCEEDED step 20/20 loss 1.5") for line in lines)
    assert any(line.startswith(f"{job.id} sw: SUCCEEDED") for line in lines)  # the final table
