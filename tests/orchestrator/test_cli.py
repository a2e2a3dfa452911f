"""`orch` client commands against a live API (fake Ray): tables by default, --json for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.server import BackgroundServer
from tests.orchestrator.conftest import TOKEN

DEMO = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "demo.yaml"
TINY = ["--set", "train.steps=4", "--set", "model.n_layers=1"]


@pytest.fixture
def api(app, monkeypatch):
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        yield url


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_follow_status_list_logs(api, capsys):
    code, out, err = run(capsys, "submit", str(DEMO), *TINY, "--follow")
    assert code == 0, err
    assert "[progress] step=1/1" in out and "SUCCEEDED" in err
    code, out, _ = run(capsys, "list", "--json")
    [job] = json.loads(out)["data"]
    assert job["state"] == "SUCCEEDED" and job["name"] == "demo"
    code, out, _ = run(capsys, "list")
    assert out.splitlines()[0].split() == ["ID", "NAME", "STATE", "ATTEMPTS", "STEP", "LOSS", "AGE"]
    assert job["id"] in out
    code, out, _ = run(capsys, "status", job["id"])
    assert code == 0 and "history" in out and "RUNNING" in out and f"orch-{job['id']}-1" in out
    code, out, _ = run(capsys, "status", job["id"], "--json")
    assert json.loads(out)["spec"]["train"]["steps"] == 4
    code, out, _ = run(capsys, "logs", job["id"])
    assert "[progress]" in out
    code, out, err = run(capsys, "cancel", job["id"])
    assert code == 1 and "409" in err


def test_submit_json_and_idempotency_key(api, capsys):
    code, out, _ = run(capsys, "submit", str(DEMO), *TINY, "--json", "--idempotency-key", "once")
    first = json.loads(out)
    code, out, _ = run(capsys, "submit", str(DEMO), *TINY, "--json", "--idempotency-key", "once")
    assert code == 0 and json.loads(out)["id"] == first["id"]


def test_invalid_spec_exits_2_and_submits_nothing(api, app, capsys):
    code, _, err = run(capsys, "submit", str(DEMO), "--set", "train.steps=0")
    assert code == 2 and "train.steps" in err
    code, _, err = run(capsys, "submit", str(DEMO), "--max-retries", "99")
    assert code == 2 and "max_retries" in err
    assert app.state.store.list()[1] == 0


def test_unknown_job_and_unreachable_api(api, capsys, monkeypatch):
    code, _, err = run(capsys, "status", "nosuchjob")
    assert code == 1 and "404" in err
    monkeypatch.setenv("ORCH_URL", "http://127.0.0.1:9")
    code, _, err = run(capsys, "list")
    assert code == 1 and "cannot reach" in err


def test_wrong_token(api, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_API_TOKEN", "not-the-token-at-all")
    code, _, err = run(capsys, "list")
    assert code == 1 and "401" in err


def test_cluster_table(api, capsys):
    code, out, _ = run(capsys, "cluster")
    assert code == 0 and "gpu" in out and "CPU=8" in out


def test_up_refuses_to_start_without_a_token(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ORCH_API_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_LOCAL", raising=False)
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path))
    code, _, err = run(capsys, "up")
    assert code == 2 and "ORCH_API_TOKEN" in err
    monkeypatch.setenv("ORCH_API_TOKEN", "changethis")
    code, _, err = run(capsys, "up")
    assert code == 2 and "ORCH_API_TOKEN" in err
