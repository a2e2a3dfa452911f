"""Elastic benchmark: scale-up from the queue, and resize through the API.

``python -m tests.bench --sections elastic``. Two local clusters, one after the other:

- scale-up: a head without CPUs running Ray's autoscaler v1 with the fake multi-node provider (one node
  type of 2 CPUs); a job (the tests' fake entry point, its driver pinned to the fake node's resource)
  queues, its demand group makes a node start, it runs there. Figures: queued -> node alive ->
  RUNNING, and how long the idle node took to go (idle timeout 15 s).
- resize: a tiny real training job (jobs.train) on a 4-CPU head, PATCHed 2 -> 1 -> 2 workers.
  Figures per resize: PATCH -> the next attempt's first step, steps lost (last step reported before
  minus the step the next attempt resumed after), loss just before and just after.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import yaml

from jobs.contracts import ProgressRecord
from jobs.specs import validate_spec
from orchestrator.api.app import create_app
from orchestrator.autoscale import FakeNodes, FakeWorkerType
from orchestrator.local_ray import LocalRayHead
from orchestrator.settings import Settings
from orchestrator.waiting import wait_until
from tests.orchestrator.serve_app import FAKE_ENTRYPOINTS
from tests.servers import BackgroundServer

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bench-elastic-token-0123456789"
RAY_TOKEN = "ray-token-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DRIVER_SLOT = "fake_node_driver"
IDLE_TIMEOUT_MINUTES = 0.25
TIMEOUT_S = 600.0
POLL_S = 0.25
STEPS = 80
TINY = [f"train.steps={STEPS}", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=2",
        "data.max_bytes=200000", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"]


def _state(head: LocalRayHead, resource: str) -> list:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=head.dashboard_url, headers=head.auth_headers)
    return client.list(StateResource(resource), options=ListApiOptions(detail=True), raise_on_missing_output=False)


def _workers(head: LocalRayHead) -> list:
    return [n for n in _state(head, "nodes") if n.state == "ALIVE" and not n.is_head_node]


def _at(job: dict, state: str) -> float:
    return next(h["at"] for h in job["history"] if h["to_state"] == state)


def scale_up(scratch: Path) -> dict:
    nodes = FakeNodes(workers=(FakeWorkerType(name="ray.worker.cpu2", cpus=2, max_workers=1,
                                              resources={DRIVER_SLOT: 1}),), idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    head = LocalRayHead(num_cpus=0, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)}, fake_nodes=nodes)
    head.start()
    try:
        settings = Settings(api_token=TOKEN, state_dir=scratch / "scale-up", ray_address=head.dashboard_url,
                            ray_auth_token=RAY_TOKEN, ray_gcs_address=head.gcs_address, reconcile_interval_s=0.25,
                            driver_resources={DRIVER_SLOT: 1.0}, autoscaler_max_extra=nodes.max_extra())
        spec = {"name": "scale-up", "resources": {"num_workers": 1}, "train": {"steps": 4, "log_every": 1}}
        app = create_app(settings, entrypoints=FAKE_ENTRYPOINTS)
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            r = c.post("/v1/jobs", json={"spec": spec})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_until(lambda: _workers(head), timeout_s=TIMEOUT_S, interval_s=POLL_S, what="a fake node")
            node_up = time.time()
            job = wait_until(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["state"] == "SUCCEEDED" and j,
                             timeout_s=TIMEOUT_S, interval_s=POLL_S, what="the job to succeed")
            wait_until(lambda: not _workers(head), timeout_s=TIMEOUT_S, interval_s=POLL_S, what="the node to go")
            node_gone = time.time()
        app.state.store.close()
    finally:
        head.stop()
    queued = _at(job, "QUEUED")
    return {"queued_to_node_s": round(node_up - queued, 1), "queued_to_running_s": round(_at(job, "RUNNING") - queued, 1),
            "idle_node_removed_after_end_s": round(node_gone - _at(job, "SUCCEEDED"), 1),
            "idle_timeout_s": IDLE_TIMEOUT_MINUTES * 60}


def _records(c: httpx.Client, job_id: str, attempt: int) -> list[ProgressRecord]:
    r = c.get(f"/v1/jobs/{job_id}/logs", params={"attempt": attempt})
    if r.status_code == 404:
        return []
    return [p for p in map(ProgressRecord.from_line, r.json()["logs"].splitlines()) if p is not None]


def resize(scratch: Path) -> list[dict]:
    head = LocalRayHead(num_cpus=4, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)})
    head.start()
    rows = []
    try:
        settings = Settings(api_token=TOKEN, state_dir=scratch / "resize", ray_address=head.dashboard_url,
                            ray_auth_token=RAY_TOKEN, reconcile_interval_s=0.25, metrics_interval_s=1.0)
        raw = yaml.safe_load((REPO / "jobs" / "examples" / "demo.yaml").read_text())
        spec = validate_spec(raw, [*TINY, f"data.path={scratch / 'data'}"]).model_dump(mode="json")
        app = create_app(settings)
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            r = c.post("/v1/jobs", json={"spec": spec})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_until(lambda: len(_records(c, job_id, 1)) >= 5, timeout_s=TIMEOUT_S, interval_s=POLL_S,
                       what="the first steps")
            for attempt, workers in ((1, 1), (2, 2)):
                t0 = time.time()
                assert c.patch(f"/v1/jobs/{job_id}", json={"num_workers": workers}).status_code == 202
                after = wait_until(lambda a=attempt: _records(c, job_id, a + 1), timeout_s=TIMEOUT_S,
                                   interval_s=POLL_S, what="the next attempt's first step")
                first_step_s = time.time() - t0
                last = _records(c, job_id, attempt)[-1]
                rows.append({"to_workers": workers, "patch_to_next_step_s": round(first_step_s, 1),
                             "steps_lost": last.step - (after[0].step - 1), "loss_before": round(last.loss, 4),
                             "loss_after": round(after[0].loss, 4)})
            wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] in ("SUCCEEDED", "FAILED"),
                       timeout_s=TIMEOUT_S, interval_s=1.0, what="the job to end")
        app.state.store.close()
    finally:
        head.stop()
    return rows


def markdown(up: dict, rows: list[dict]) -> list[str]:
    return ["## Elastic: scale-up from the queue, resize through the API", "",
            "`python -m tests.bench --sections elastic`. Scale-up: a head without CPUs, Ray's autoscaler v1 with "
            "the fake multi-node provider (a node of 2 CPUs), a queued job (fake entry point) whose pending "
            "placement group makes the node start. Resize: a tiny real `jobs.train` job on a 4-CPU head, "
            "`PATCH /v1/jobs/{id}` 2 -> 1 -> 2 workers (checkpoint now, stop, restart from it).", "",
            "| queued -> node alive (s) | queued -> RUNNING (s) | job end -> idle node gone (s) | idle timeout (s) |",
            "|---:|---:|---:|---:|",
            f"| {up['queued_to_node_s']} | {up['queued_to_running_s']} | {up['idle_node_removed_after_end_s']} | "
            f"{up['idle_timeout_s']:g} |", "",
            "| resize to | PATCH -> next step (s) | steps lost | loss before | loss after |",
            "|---:|---:|---:|---:|---:|",
            *[f"| {r['to_workers']} | {r['patch_to_next_step_s']} | {r['steps_lost']} | {r['loss_before']} | "
              f"{r['loss_after']} |" for r in rows]]


def elastic_section(scratch: Path) -> dict:
    up = scale_up(scratch)
    rows = resize(scratch)
    return {"data": {"name": "elastic", "scale_up": up, "resizes": rows}, "markdown": markdown(up, rows)}
