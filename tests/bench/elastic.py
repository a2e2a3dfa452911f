"""Elastic benchmark: scale-up from the queue, resize through the API, a node lost, a node drained.

``python -m tests.bench --sections elastic``. Three local clusters, one after the other:

- scale-up: a head without CPUs running Ray's autoscaler v1 with the fake multi-node provider (one node
  type of 2 CPUs); a job (the tests' fake entry point, its driver pinned to the fake node's resource)
  queues, its demand group makes a node start, it runs there. Figures: queued -> node alive ->
  RUNNING, and how long the idle node took to go (idle timeout 15 s).
- resize: a tiny real training job (jobs.train) on a 4-CPU head, PATCHed 2 -> 1 -> 2 workers.
  Figures per resize: PATCH -> the next attempt's first step, the stop checkpoint's step, steps lost
  (last step reported before minus the step the next attempt resumed from: the stop's request holds
  the loop after its checkpoint, so at most the step in flight), the loss at the checkpoint's step
  and the first loss after the resume.
- node loss and drain on a multi-node cluster: tests/bench/elastic_nodes.py;
- a killed worker, Ray Train restarting the group inside the job: the seconds to the next step broken
  down and the throughput before and after, with Ray's defaults and the job's settings side by side
  (tests/bench/recovery.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import yaml

from jobs.contracts.training import ProgressRecord
from jobs.specs.train import validate_spec
from orchestrator.api.app import create_app
from orchestrator.local.autoscale import FakeNodes, FakeWorkerType
from orchestrator.local.head import LocalRayHead
from orchestrator.settings import Settings
from tests.bench.elastic_nodes import markdown as node_markdown
from tests.bench.elastic_nodes import node_rows
from tests.bench.recovery import markdown as recovery_markdown
from tests.bench.recovery import recovery_rows
from tests.support.serve_app import FAKE_ENTRYPOINTS
from tests.support.servers import BackgroundServer
from workers.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bench-elastic-token-0123456789"
RAY_TOKEN = "ray-token-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DRIVER_SLOT = "fake_node_driver"
IDLE_TIMEOUT_MINUTES = 0.25
TIMEOUT_S = 600.0
POLL_S = 0.25
# The controller's wait for the loop's stop checkpoint (Settings default 20 s): on this shared, loaded
# 2-core machine one step and its checkpoint can take longer, and a resize would then stop without one.
STOP_CHECKPOINT_TIMEOUT_S = 120.0
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


def _log(c: httpx.Client, job_id: str, attempt: int) -> str:
    r = c.get(f"/v1/jobs/{job_id}/logs", params={"attempt": attempt})
    return "" if r.status_code == 404 else r.json()["logs"]


def _records(c: httpx.Client, job_id: str, attempt: int) -> list[ProgressRecord]:
    return [p for p in map(ProgressRecord.from_line, _log(c, job_id, attempt).splitlines()) if p is not None]


def _checkpoint_steps(job: dict, resize_number: int) -> int | None:
    """The step of that resize's stop checkpoint, from the job's history (the controller notes it in the
    reason of the QUEUED state after the stop: "resized (checkpoint at step N first)"); None when no
    checkpoint was confirmed in time (the next attempt then resumes from the latest one before)."""
    resized = [h["reason"] for h in job["history"] if h["to_state"] == "QUEUED" and h["reason"].startswith("resized")]
    m = re.search(r"checkpoint at step (\d+) first", resized[resize_number - 1])
    return int(m.group(1)) if m else None


def _resize_phases(job: dict, patched: float, resumed: float, first_step: float) -> dict:
    """Where a resize's seconds go (UNIX times): PATCH -> the old attempt stopped after its checkpoint
    (QUEUED in the job's history) -> resubmitted (STARTING) -> the new driver running (RUNNING) -> the
    loop resumed from the checkpoint (its "resuming from step" note in the log: Ray Train's start, the
    worker processes and their imports, the process group, model build, checkpoint load) -> first step
    (the data pipeline's start, the first batch, the step)."""
    at = {}
    for h in job["history"]:
        if h["at"] >= patched and h["to_state"] not in at:
            at[h["to_state"]] = h["at"]
    marks = [patched, at["QUEUED"], at["STARTING"], at["RUNNING"], resumed, first_step]
    names = ("stopped_s", "resubmitted_s", "driver_running_s", "resumed_s", "first_step_s")
    return {n: round(b - a, 1) for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)}


def _resize_row(workers: int, first_step_s: float, before: list[ProgressRecord], after: ProgressRecord,
                checkpoint_step: int | None) -> dict:
    """One resize: steps lost are the steps the old attempt logged past the step the next attempt
    resumed from (redone); the losses compared are those of the checkpoint's step and of the first step
    after it, consecutive steps of one curve."""
    resumed_from = after.step - 1  # records carry the steps done: the first one after a resume is from + 1
    at_checkpoint = next((r for r in before if r.step == checkpoint_step), None)
    return {"to_workers": workers, "patch_to_next_step_s": round(first_step_s, 1), "checkpoint_step": checkpoint_step,
            "last_step_before": before[-1].step, "resumed_from": resumed_from,
            "steps_lost": before[-1].step - resumed_from,
            "loss_before": round(at_checkpoint.loss, 4) if at_checkpoint else None, "loss_after": round(after.loss, 4)}


def resize(scratch: Path) -> list[dict]:
    head = LocalRayHead(num_cpus=4, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)})
    head.start()
    rows = []
    try:
        settings = Settings(api_token=TOKEN, state_dir=scratch / "resize", ray_address=head.dashboard_url,
                            ray_auth_token=RAY_TOKEN, reconcile_interval_s=0.25, metrics_interval_s=1.0,
                            stop_checkpoint_timeout_s=STOP_CHECKPOINT_TIMEOUT_S)
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
                wait_until(lambda a=attempt: "resuming from step" in _log(c, job_id, a + 1), timeout_s=TIMEOUT_S,
                           interval_s=POLL_S, what="the next attempt's resume")
                resumed = time.time()
                after = wait_until(lambda a=attempt: _records(c, job_id, a + 1), timeout_s=TIMEOUT_S,
                                   interval_s=POLL_S, what="the next attempt's first step")
                first_step = time.time()
                job = c.get(f"/v1/jobs/{job_id}").json()
                rows.append({**_resize_row(workers, first_step - t0, _records(c, job_id, attempt), after[0],
                                           _checkpoint_steps(job, attempt)),
                             **_resize_phases(job, t0, resumed, first_step)})
            wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] in ("SUCCEEDED", "FAILED"),
                       timeout_s=TIMEOUT_S, interval_s=1.0, what="the job to end")
        app.state.store.close()
    finally:
        head.stop()
    return rows


def markdown(up: dict, rows: list[dict], nodes: dict, recovery: list[dict]) -> list[str]:
    return ["## Elastic: scale-up from the queue, resize through the API, node loss, drain", "",
            "`python -m tests.bench --sections elastic`. Times taken on a shared 2-core machine, loaded by "
            "other Ray runs: read them as upper bounds. Scale-up: a head without CPUs, Ray's autoscaler v1 with "
            "the fake multi-node provider (a node of 2 CPUs), a queued job (fake entry point) whose pending "
            "placement group makes the node start. Resize: a tiny real `jobs.train` job on a 4-CPU head, "
            "`PATCH /v1/jobs/{id}` 2 -> 1 -> 2 workers (checkpoint now and hold, stop, restart from it): steps "
            "lost are the steps logged past the step resumed from; the losses are those of the checkpoint's "
            "step and of the next step, the first of the next attempt. The controller waits up to "
            f"{STOP_CHECKPOINT_TIMEOUT_S:.0f} s for the stop checkpoint (default 20 s: one step can take longer "
            "on this loaded machine). Where a resize's seconds go: PATCH -> the old attempt stopped (the loop "
            "checkpoints at the end of its step and holds, Ray Jobs stops the driver) -> resubmitted (the scheduler's "
            "pass) -> the new driver running -> resumed (the loop's resume note: Ray Train's start, the worker "
            "processes and their imports, the process group, the model and the checkpoint load) -> first step "
            "(the data pipeline's start, the first batch, the step); from the job's history and its log, polled "
            f"every {POLL_S} s.", "",
            "| queued -> node alive (s) | queued -> RUNNING (s) | job end -> idle node gone (s) | idle timeout (s) |",
            "|---:|---:|---:|---:|",
            f"| {up['queued_to_node_s']} | {up['queued_to_running_s']} | {up['idle_node_removed_after_end_s']} | "
            f"{up['idle_timeout_s']:g} |", "",
            "| resize to | PATCH -> next step (s) | -> stopped | -> resubmitted | -> driver running | -> resumed | "
            "-> first step | checkpoint step | last step before | resumed from | steps lost | loss at checkpoint | "
            "first loss after |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['to_workers']} | {r['patch_to_next_step_s']} | {r['stopped_s']} | {r['resubmitted_s']} | "
              f"{r['driver_running_s']} | {r['resumed_s']} | {r['first_step_s']} | {r['checkpoint_step']} | "
              f"{r['last_step_before']} | {r['resumed_from']} | {r['steps_lost']} | {r['loss_before']} | "
              f"{r['loss_after']} |" for r in rows],
            "", *node_markdown(nodes), "", *recovery_markdown(recovery)]


def elastic_section(scratch: Path) -> dict:
    up = scale_up(scratch)
    rows = resize(scratch)
    nodes = node_rows(scratch / "nodes", scratch / "data", TINY)
    recovery = recovery_rows(scratch / "recovery")
    return {"data": {"name": "elastic", "scale_up": up, "resizes": rows, **nodes, "recovery": recovery},
            "markdown": markdown(up, rows, nodes, recovery)}
