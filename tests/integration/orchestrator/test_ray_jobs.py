"""Against a real local Ray cluster (one per module, token auth on): end to end with the real
jobs.train, a controller SIGKILLed between storing and submitting, cancel while STARTING, a job the
cluster can never fit, a job held without CPUs marked stalled, a real job resized 2 -> 1 -> 2, and
a retry after the whole cluster restarts. Every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from jobs.contracts.training import ProgressRecord
from jobs.specs.train import validate_spec
from orchestrator import cli
from orchestrator.api.app import create_app
from orchestrator.local.head import LocalRayHead
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store, submission_id_for
from tests.support.serve_app import FAKE_ENTRYPOINTS
from tests.support.servers import BackgroundServer, free_port, wait_until_healthy
from workers.waiting import wait_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "jobs" / "examples" / "demo.yaml"
TOKEN = "integration-token-0123456789"
RAY_TOKEN = "ray-token-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = ["train.steps=4", "train.batch_size=2", "train.log_every=1", "data.max_bytes=200000",
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
TRAIN_TIMEOUT_S = 400.0  # the real 4-step job takes ~1.5 min on 2 busy cores
FAKE_TIMEOUT_S = 120.0
# A restarted head's job agent can take minutes to accept submissions on 2 starved cores (seen:
# "No available agent to submit job" past 120 s at load 12); still bounded.
RESTART_TIMEOUT_S = 360.0
STATE_POLL_S = 0.25
HEAD_CPUS = 4
# The real driver's start on a busy machine (imports, shards, joining the cluster), then a few reads.
STALL_TIMEOUT_S = 90.0
# The resized job: long enough never to end during its test (a job that ended before a resize
# landed would have nothing to resume); it is stopped once the third attempt's curve is seen.
RESIZE_STEPS = 100_000
PHASE_TIMEOUT_S = 300.0  # a worker group restart on 2 busy cores
LOSS_WINDOW_STEPS = 5
LOSS_JUMP_TOLERANCE = 0.15  # relative, between 5-step means: the curve's drift, far below a restart from scratch


def _head(**kw) -> LocalRayHead:
    # PYTHONPATH: drivers import `tests.support.fake_train` (jobs/ and workers/ are pip-installed).
    return LocalRayHead(num_cpus=HEAD_CPUS, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)}, **kw)


@pytest.fixture(scope="module")
def ray_head():
    head = _head()
    head.start()
    yield head
    head.stop()


def _settings(tmp_path: Path, head: LocalRayHead, **kw) -> Settings:
    kw = {"reconcile_interval_s": 0.25, "metrics_interval_s": 1.0} | kw
    return Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=head.dashboard_url,
                    ray_auth_token=RAY_TOKEN, **kw)


def _spec(tmp_path: Path, extra: list[str] = ()) -> dict:
    raw = yaml.safe_load(DEMO.read_text())
    return validate_spec(raw, [*TINY, f"data.path={tmp_path / 'data'}", *extra]).model_dump(mode="json")


def _ray_client(head: LocalRayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)


def _ray_jobs_of(head: LocalRayHead, job_id: str) -> list:
    return [j for j in _ray_client(head).list_jobs() if (j.metadata or {}).get("orch_job_id") == job_id]


def _wait(c: httpx.Client, job_id: str, states: set[str], timeout_s: float, interval_s: float = STATE_POLL_S) -> dict:
    job: dict = {}

    def reached() -> dict | None:
        job.update(c.get(f"/v1/jobs/{job_id}").json())
        return job if job["state"] in states else None

    return wait_until(reached, timeout_s=timeout_s, interval_s=interval_s,
                      what=lambda: f"job {job_id} to reach {states} (it is {job.get('state')}: {job.get('message')})")


def test_end_to_end_demo_spec_over_rest_with_the_real_entry_point(ray_head, tmp_path):
    app = create_app(_settings(tmp_path, ray_head))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        r = c.post("/v1/jobs", json={"spec": _spec(tmp_path)})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        text = ""
        with c.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"},
                      timeout=httpx.Timeout(30, read=TRAIN_TIMEOUT_S)) as s:
            for chunk in s.iter_text():
                text += chunk
        job = _wait(c, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, 60)
    assert job["state"] == "SUCCEEDED", (job["message"], text[-3000:])
    assert "[progress] step=4/4" in text and "python -m jobs.train --spec" in text
    assert [h["to_state"] for h in job["history"]] == ["PENDING", "QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    m = job["metrics"]
    assert m["step"] == 4 and m["total_steps"] == 4 and m["loss"] > 0 and m["final_loss"] > 0 and m["wire_bytes"] > 0
    [ray_job] = _ray_jobs_of(ray_head, job_id)
    assert ray_job.submission_id == job["ray_submission_id"] == submission_id_for(job_id, 1)
    assert ray_job.status == "SUCCEEDED"
    assert (tmp_path / "state" / "jobs" / job_id / "out" / "summary.json").exists()


def _start_service(tmp_path: Path, head: LocalRayHead, port: int, crash: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_API_TOKEN=TOKEN, ORCH_STATE_DIR=str(tmp_path / "state"), ORCH_PORT=str(port),
               ORCH_RAY_ADDRESS=head.dashboard_url, ORCH_RAY_AUTH_TOKEN=RAY_TOKEN, ORCH_RECONCILE_INTERVAL_S="0.25",
               PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "tests.support.serve_app", *(["--crash-at", "before_submit"] if crash else [])]
    log_path = tmp_path / f"service-{int(crash)}.log"
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wait_until_healthy(proc, f"http://127.0.0.1:{port}", log_path.read_text, timeout_s=60)
    return proc


def test_controller_sigkilled_between_storing_and_submitting_runs_the_job_exactly_once(ray_head, tmp_path):
    port = free_port()
    proc = _start_service(tmp_path, ray_head, port, crash=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as c:
            job_id = c.post("/v1/jobs", json={"spec": _spec(tmp_path, ["train.steps=3"])}).json()["id"]
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    store = Store(f"sqlite:///{tmp_path / 'state' / 'orch.db'}")
    job = store.jobs.get(job_id)
    store.close()
    assert job.state is JobState.STARTING and job.current_attempt.submitted_at is None  # intent stored, no call
    assert _ray_jobs_of(ray_head, job_id) == []

    proc = _start_service(tmp_path, ray_head, port, crash=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as c:
            job = _wait(c, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, FAKE_TIMEOUT_S)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert job["state"] == "SUCCEEDED", job["message"]
    ray_jobs = _ray_jobs_of(ray_head, job_id)
    assert [(j.submission_id, j.status) for j in ray_jobs] == [(submission_id_for(job_id, 1), "SUCCEEDED")]
    assert job["attempts"] == 1 and job["metrics"]["step"] == 3


def test_cancel_while_starting_ends_cancelled_and_stops_the_ray_job(ray_head, tmp_path):
    app = create_app(_settings(tmp_path, ray_head, reconcile_interval_s=0.05), entrypoints=FAKE_ENTRYPOINTS)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        job_id = c.post("/v1/jobs", json={"spec": _spec(tmp_path, ["train.steps=60"])}).json()["id"]
        _wait(c, job_id, {"STARTING"}, FAKE_TIMEOUT_S, interval_s=0.02)
        # STARTING lasts at least the submit call and Ray's PENDING phase (seconds), so this lands in it.
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "STARTING"
        job = _wait(c, job_id, {"CANCELLED", "SUCCEEDED", "FAILED"}, FAKE_TIMEOUT_S)
    assert job["state"] == "CANCELLED", job["message"]
    assert [h["to_state"] for h in job["history"]][-2:] in (["STARTING", "CANCELLED"], ["RUNNING", "CANCELLED"])
    [ray_job] = _ray_jobs_of(ray_head, job_id)
    assert ray_job.status == "STOPPED" and job["attempt_history"][0]["ray_status"] == "STOPPED"


def test_a_job_the_cluster_can_never_fit_is_refused_naming_the_shortfall(ray_head, tmp_path):
    """2 workers x 2 CPUs plus Ray Data's CPU on a 4-CPU head: once the controller has seen the
    cluster, the submit is a 422 that names the pool and what is missing, and nothing is stored."""
    app = create_app(_settings(tmp_path, ray_head))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        wait_until(lambda: bool(getattr(app.state.controller.scheduler.snapshot, "pools", None)), timeout_s=60, interval_s=0.2,
                   what="the controller's first look at the cluster")
        r = c.post("/v1/jobs", json={"spec": _spec(tmp_path, ["resources.cpus_per_worker=2"])})
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "spec", "resources"]
        assert "the job can never run on this cluster: pool cpu can hold at most" in error["msg"]
        assert "short by" in error["msg"]
        assert c.get("/v1/jobs").json()["count"] == 0


def test_a_job_held_without_cpus_is_marked_stalled_in_the_api_orch_status_and_metrics(
        ray_head, tmp_path, monkeypatch, capsys):
    """Another Ray job holds every CPU of the head, so the real jobs.train's workers are never
    scheduled: Ray says RUNNING, no step comes, and the control plane says so."""
    blocker = _ray_client(ray_head).submit_job(entrypoint="sleep 300", entrypoint_num_cpus=HEAD_CPUS)
    try:
        wait_until(lambda: _ray_client(ray_head).get_job_status(blocker) == "RUNNING", timeout_s=FAKE_TIMEOUT_S,
                   interval_s=STATE_POLL_S, what="the blocker job to hold the head's CPUs")
        app = create_app(_settings(tmp_path, ray_head, stall_after_s=3.0, stop_checkpoint_timeout_s=0.0))
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            job_id = c.post("/v1/jobs", json={"spec": _spec(tmp_path)}).json()["id"]

            def stalled_in_fit() -> dict | None:  # the driver reached fit(): only CPUs are missing
                job = c.get(f"/v1/jobs/{job_id}").json()
                started = "train: 2 workers" in c.get(f"/v1/jobs/{job_id}/logs").json()["logs"]
                stalled_s = (job["metrics"] or {}).get("stalled_for_s", 0)
                return job if started and stalled_s >= 10 else None

            job = wait_until(stalled_in_fit, timeout_s=STALL_TIMEOUT_S, interval_s=1.0,
                             what=f"job {job_id} to be marked stalled in fit()")
            assert job["state"] == "RUNNING" and "step" not in job["metrics"]
            assert "no step reported yet" in job["metrics"]["stalled"]
            assert "orch_jobs_stalled 1.0" in c.get("/metrics").text
            monkeypatch.setenv("ORCH_URL", url)
            monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
            assert cli.main(["status", job_id]) == 0
            assert any(line.startswith("stalled ") and "no progress for" in line
                       for line in capsys.readouterr().out.splitlines())
            c.post(f"/v1/jobs/{job_id}/cancel")
            job = _wait(c, job_id, {"CANCELLED", "SUCCEEDED", "FAILED"}, FAKE_TIMEOUT_S)
            assert job["state"] == "CANCELLED" and "stalled" not in (job["metrics"] or {})
            wait_until(lambda: "orch_jobs_stalled 0.0" in c.get("/metrics").text, timeout_s=10, interval_s=0.25,
                       what="the stalled gauge to drop")
    finally:
        _ray_client(ray_head).stop_job(blocker)


def test_a_failed_job_says_what_failed_first_with_the_full_log_one_command_away(
        ray_head, tmp_path, monkeypatch, capsys):
    """The real jobs.train with a data source that does not exist: Ray's message starts with its own
    preamble and runtime-env lines; the job's message, in the API and `orch status`, leads with the
    job's own ``error:`` line and names `orch logs`, which shows the whole log."""
    app = create_app(_settings(tmp_path, ray_head))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        spec = _spec(tmp_path, [f"data.source={tmp_path / 'no-such-corpus'}"])
        job_id = c.post("/v1/jobs", json={"spec": spec, "max_retries": 0}).json()["id"]
        job = _wait(c, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, FAKE_TIMEOUT_S)
        assert job["state"] == "FAILED"
        assert job["attempt_history"][0]["ray_message"].startswith("Job entrypoint command failed")
        assert job["message"].startswith(f"error: data.source: folder {tmp_path / 'no-such-corpus'} does not exist")
        assert job["message"].endswith(f"(exit code 1; full log: orch logs {job_id})")
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        assert cli.main(["status", job_id]) == 0
        [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("message ")]
        assert row.split(None, 1)[1].startswith("error: data.source:")
        assert cli.main(["logs", job_id]) == 0
        assert "python -m jobs.train --spec" in (logs := capsys.readouterr().out) and "error: data.source:" in logs


def _attempt_records(c: httpx.Client, job_id: str, attempt: int) -> list[ProgressRecord]:
    r = c.get(f"/v1/jobs/{job_id}/logs", params={"attempt": attempt})
    if r.status_code == 404:  # no such attempt yet
        return []
    logs = r.json()["logs"]
    return [r for r in map(ProgressRecord.from_line, logs.splitlines()) if r is not None]


def _resize_and_wait(c: httpx.Client, job_id: str, workers: int) -> dict:
    """PATCH, then wait for the next attempt to report a step."""
    before = c.get(f"/v1/jobs/{job_id}").json()["attempts"]
    r = c.patch(f"/v1/jobs/{job_id}", json={"num_workers": workers})
    assert r.status_code == 202, r.text

    def stepping() -> dict | None:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] not in ("FAILED", "CANCELLED"), job["message"]
        return job if job["attempts"] > before and _attempt_records(c, job_id, job["attempts"]) else None

    def what() -> str:
        job = c.get(f"/v1/jobs/{job_id}").json()
        history = "; ".join(f"{h['to_state']}: {h['reason']}" for h in job["history"])
        return f"job {job_id} to step again on {workers} workers (now {job['state']}; {history})"

    return wait_until(stepping, timeout_s=PHASE_TIMEOUT_S, interval_s=1.0, what=what)


def test_a_real_job_resized_2_1_2_continues_its_loss_curve(ray_head, tmp_path):
    """A real training job (jobs.train, tiny) resized through PATCH /v1/jobs/{id}, 2 -> 1 -> 2 workers:
    each resize checkpoints, stops and restarts from that checkpoint, and the loss curve goes on from
    the checkpoint's step, and no step past the checkpoint is made (the loop holds after it until
    Ray's stop lands; tests/bench/elastic.py measures it). The job is stopped once the test has seen
    the third attempt's curve, leaving the module's cluster free."""
    app = create_app(_settings(tmp_path, ray_head))
    spec = _spec(tmp_path, [f"train.steps={RESIZE_STEPS}", "train.warmup_steps=2"])
    job_id = None
    try:
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            job_id = c.post("/v1/jobs", json={"spec": spec, "max_retries": 1}).json()["id"]
            wait_until(lambda: len(_attempt_records(c, job_id, 1)) >= 3, timeout_s=PHASE_TIMEOUT_S, interval_s=1.0,
                       what="the first attempt to report steps")
            _resize_and_wait(c, job_id, 1)
            _resize_and_wait(c, job_id, 2)
            wait_until(lambda: len(_attempt_records(c, job_id, 3)) >= LOSS_WINDOW_STEPS, timeout_s=PHASE_TIMEOUT_S,
                       interval_s=1.0, what="the third attempt's first steps")
            job = c.get(f"/v1/jobs/{job_id}").json()
            attempts = [_attempt_records(c, job_id, n) for n in (1, 2, 3)]
    finally:  # the controller has stopped with the server: nothing resubmits the job
        for ray_job in _ray_jobs_of(ray_head, job_id) if job_id else []:
            _ray_client(ray_head).stop_job(ray_job.submission_id)
        wait_until(lambda: not job_id or all(j.status in ("STOPPED", "SUCCEEDED", "FAILED")
                                             for j in _ray_jobs_of(ray_head, job_id)),
                   timeout_s=FAKE_TIMEOUT_S, interval_s=STATE_POLL_S, what="the resized job's Ray jobs to stop")
    assert job["state"] == "RUNNING", job["message"]
    assert job["attempts"] == 3 and job["resizes"] == 2 and job["max_retries"] == 1
    reasons = [h["reason"] for h in job["history"] if h["to_state"] == "RESIZING"]
    assert reasons == ["resizing from 2 workers to 1 worker", "resizing from 1 worker to 2 workers"]
    assert job["spec"]["resources"]["num_workers"] == 2
    queued = [h["reason"] for h in job["history"] if h["to_state"] == "QUEUED" and "resized" in h["reason"]]
    saved_at = [re.search(r"checkpoint at step (\d+) first", r) for r in queued]
    assert len(saved_at) == 2 and all(saved_at), queued
    checkpoints = [int(m.group(1)) for m in saved_at]
    for before, after, saved in zip(attempts[:-1], attempts[1:], checkpoints, strict=True):
        assert after[0].step == saved + 1  # the next attempt goes on from the checkpoint taken for the resize
        assert before[-1].step <= saved  # the loop held after it: no step was made, and redone, past it
        # One batch's loss is noisy: compare the curve over a few steps on each side of the checkpoint.
        ending = statistics.mean(r.loss for r in before if saved - LOSS_WINDOW_STEPS < r.step <= saved)
        resumed = statistics.mean(r.loss for r in after[:LOSS_WINDOW_STEPS])
        assert abs(resumed - ending) <= LOSS_JUMP_TOLERANCE * ending, (ending, resumed)
        assert resumed < attempts[0][0].loss - 0.5 * (attempts[0][0].loss - ending)  # not a restart from scratch
    assert attempts[0][0].loss - attempts[-1][-1].loss > 0  # it learned across the resizes


def test_job_is_retried_from_its_checkpoint_after_the_cluster_restarts(ray_head, tmp_path):
    """Last in this module: it replaces the module's cluster by a new one at the same address (two
    clusters at once would overload 2 cores)."""
    settings = _settings(tmp_path, ray_head)
    app = create_app(settings, entrypoints=FAKE_ENTRYPOINTS)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        body = {"spec": _spec(tmp_path, ["train.steps=12"]), "max_retries": 2}
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        _wait(c, job_id, {"RUNNING"}, FAKE_TIMEOUT_S)
        ckpt = settings.job_root / job_id / "out" / "checkpoint.json"
        wait_until(ckpt.exists, timeout_s=FAKE_TIMEOUT_S, interval_s=0.1, what=f"attempt 1 to write {ckpt}")
        ray_head.kill()  # the head crashes; the driver dies with the cluster
        second = _head(gcs_port=ray_head.gcs_port, dashboard_port=ray_head.dashboard_port)
        second.start()
        try:
            job = _wait(c, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, RESTART_TIMEOUT_S)
        finally:
            second.stop()
    assert job["state"] == "SUCCEEDED", job["message"]
    states = [h["to_state"] for h in job["history"]]
    assert "RETRYING" in states and job["attempts"] == 2
    retry = next(h for h in job["history"] if h["to_state"] == "RETRYING")
    assert "lost" in retry["reason"]
    summary = json.loads((settings.job_root / job_id / "out" / "summary.json").read_text())
    assert summary["resumed_from"] > 0  # attempt 2 continued after attempt 1's checkpoint
