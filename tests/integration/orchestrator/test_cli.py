"""`orch` client commands against a live API (fake Ray): tables by default, --json for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from orchestrator import cli
from orchestrator.cli import render
from tests.support.control_plane import AUTH, TOKEN
from tests.support.servers import BackgroundServer

DEMO = Path(__file__).resolve().parents[3] / "jobs" / "examples" / "demo.yaml"
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
    assert out.splitlines()[0].split() == ["ID", "NAME", "STATE", "ATTEMPTS", "STEP", "LOSS", "AGE", "QUEUE"]
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
    assert app.state.store.jobs.list()[1] == 0


def test_submit_takes_any_job_kind(api, app, capsys):
    prepare = DEMO.with_name("prepare.yaml")
    code, _, err = run(capsys, "submit", str(prepare))  # read as a train spec: its fields are unknown there
    assert code == 2 and "tokenizer: unknown field" in err
    code, _, err = run(capsys, "submit", str(prepare), "--kind", "nosuch")
    assert code == 2 and "unknown job kind 'nosuch'" in err
    code, _, err = run(capsys, "submit", str(prepare), "--kind", "prepare", "--set", "vocab_size=1")
    assert code == 2 and "vocab_size" in err
    assert app.state.store.jobs.list()[1] == 0
    code, out, err = run(capsys, "submit", str(prepare), "--kind", "prepare", "--set", "vocab_size=512", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["kind"] == "prepare" and job["spec"]["vocab_size"] == 512
    # A serve spec is a deployment (one namespace for every team's applications), never a plain job.
    code, _, err = run(capsys, "submit", str(DEMO.with_name("serve.yaml")), "--kind", "serve")
    assert code == 2 and "orch serve CHECKPOINT" in err
    assert app.state.store.jobs.list()[1] == 1


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
    assert code == 0
    # One line per pool, in the specs' device vocabulary (FakeRay: a CPU-only head and a GPU node).
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["DEVICE", "NODES"], ["cpu", "1"], ["gpu", "1"]]
    # Then the scheduler's pools: each node's pool, with what it holds and what waits for it.
    assert any(line.split()[:2] == ["gpu", "1"] for line in lines[lines.index(next(x for x in lines if "POOL" in x)):])
    assert "CPU=8, GPU=1" in out


def test_json_is_the_api_answer_byte_for_byte(api, capsys):
    code, out, _ = run(capsys, "submit", str(DEMO), *TINY, "--follow", "--json")
    assert code == 0
    job = json.loads(out[out.index("\n{") + 1:])  # the logs, then the finished job
    assert job["state"] == "SUCCEEDED"

    def api_json(path: str) -> str:
        return json.dumps(httpx.get(api + path, headers=AUTH).json(), indent=2) + "\n"

    for argv, path in [(["list"], "/v1/jobs?limit=50"), (["status", job["id"]], f"/v1/jobs/{job['id']}"),
                       (["cluster"], "/v1/cluster")]:
        code, out, _ = run(capsys, *argv, "--json")
        assert code == 0 and out == api_json(path), argv


def test_tables_off_a_terminal_are_plain_columns(api, capsys):
    run(capsys, "submit", str(DEMO), *TINY, "--follow")
    [job] = json.loads(run(capsys, "list", "--json")[1])["data"]
    for argv in (["list"], ["status", job["id"]], ["cluster"]):
        code, out, _ = run(capsys, "--url", api, *argv)
        assert code == 0 and out.endswith("\n")
        assert "\x1b" not in out and "\u2500" not in out, argv  # no colour, no rules
        assert all(line == line.rstrip() for line in out.splitlines()), argv
    lines = run(capsys, "list")[1].splitlines()
    assert len(lines) == 2 and lines[1].split()[:4] == [job["id"], "demo", "SUCCEEDED", "1"]
    out = run(capsys, "status", job["id"])[1]
    assert out.splitlines()[0].split() == ["FIELD", "VALUE"]
    assert ["state", "SUCCEEDED"] in [line.split() for line in out.splitlines()]
    assert "\nhistory\nAT" in out and "\nmetrics\nMETRIC" in out


def test_tables_on_a_terminal_have_colour_and_a_header_rule(api, capsys, monkeypatch):
    run(capsys, "submit", str(DEMO), *TINY, "--follow")
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats stdout as a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = run(capsys, "list")
    assert code == 0 and "\x1b[" in out and "\u2500" in out and "SUCCEEDED" in out


def test_cells_are_text_never_markup_and_never_wrapped(capsys):
    long = "x" * 300
    render.emit(render.table(["A", "B"], [["[bold]b[/bold] :smile:", long], [None, 1.5]]))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["A                       B", f"[bold]b[/bold] :smile:  {long}", "-                       1.5"]


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    code, out, _ = run(capsys)  # no command: the help, as a usage error
    assert code == 2 and "Usage: orch" in out and "submit" in out
    for argv in (["bogus"], ["list", "--state", "DONE"], ["list", "--limit", "many"], ["status"],
                 ["submit", "x.yaml", "--no-such-option"], ["list", "--url", "http://127.0.0.1:9"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "Usage: orch" in err, argv
    for command in ([], ["up"], ["submit"], ["list"], ["status"], ["logs"], ["cancel"], ["cluster"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "Usage: orch" in out, command
    assert "cpu | gpu | npu" in run(capsys, "cluster", "-h")[1]


def test_up_refuses_to_start_without_a_token(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ORCH_API_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_LOCAL", raising=False)
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path))
    code, _, err = run(capsys, "up")
    assert code == 2 and "ORCH_API_TOKEN" in err
    monkeypatch.setenv("ORCH_API_TOKEN", "changethis")
    code, _, err = run(capsys, "up")
    assert code == 2 and "ORCH_API_TOKEN" in err
