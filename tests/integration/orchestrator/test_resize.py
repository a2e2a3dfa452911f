"""A real training job (jobs.train, tiny) resized through PATCH /v1/jobs/{id} on a real local Ray
cluster, 2 -> 1 -> 2 workers: each resize checkpoints, stops and restarts from that checkpoint, and
the loss curve goes on from the checkpoint's step, and no step past the checkpoint is made (the loop
holds after it until Ray's stop lands; tests/bench/elastic.py measures it). The job is long enough
never to end during the test: it is left running when the test has seen the third attempt's curve,
and the head's stop ends it. Every wait is bounded."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import httpx
import pytest
import yaml

from jobs.contracts.training import ProgressRecord
from jobs.specs.train import validate_spec
from orchestrator.api.app import create_app
from orchestrator.local.head import LocalRayHead
from orchestrator.settings import Settings
from tests.support.servers import BackgroundServer
from workers.waiting import wait_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "jobs" / "examples" / "demo.yaml"
TOKEN = "resize-token-0123456789"
RAY_TOKEN = "ray-token-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEPS = 100_000  # never reached: a job that ended before a resize landed would have nothing to resume
TINY = [f"train.steps={STEPS}", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=2",
        "data.max_bytes=200000", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]
HEAD_CPUS = 4
PHASE_TIMEOUT_S = 300.0  # a worker group restart on 2 busy cores
LOSS_WINDOW_STEPS = 5
LOSS_JUMP_TOLERANCE = 0.15  # relative, between 5-step means: the curve's drift, far below a restart from scratch


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


def test_a_real_job_resized_2_1_2_continues_its_loss_curve(tmp_path):
    head = LocalRayHead(num_cpus=HEAD_CPUS, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)})
    head.start()
    try:
        settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=head.dashboard_url,
                            ray_auth_token=RAY_TOKEN, reconcile_interval_s=0.25, metrics_interval_s=1.0)
        spec = validate_spec(yaml.safe_load(DEMO.read_text()), [*TINY, f"data.path={tmp_path / 'data'}"])
        app = create_app(settings)
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            job_id = c.post("/v1/jobs", json={"spec": spec.model_dump(mode="json"), "max_retries": 1}).json()["id"]
            wait_until(lambda: len(_attempt_records(c, job_id, 1)) >= 3, timeout_s=PHASE_TIMEOUT_S, interval_s=1.0,
                       what="the first attempt to report steps")
            _resize_and_wait(c, job_id, 1)
            _resize_and_wait(c, job_id, 2)
            wait_until(lambda: len(_attempt_records(c, job_id, 3)) >= LOSS_WINDOW_STEPS, timeout_s=PHASE_TIMEOUT_S,
                       interval_s=1.0, what="the third attempt's first steps")
            job = c.get(f"/v1/jobs/{job_id}").json()
            attempts = [_attempt_records(c, job_id, n) for n in (1, 2, 3)]
    finally:
        head.stop()
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
