"""Deployments end to end: a real Ray head (token auth), the service deploying through Ray jobs
(``python -m jobs.serve``), ONE Ray Serve instance on a loopback port shared by the module, tiny
random-weight checkpoints (replicas reserve no CPU), the real ``openai`` client. The tests run in
file order and build on each other: alpha, then beta beside it, then a service restart with alpha
deleted behind its back, then a delete, then a promoted sweep. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from jobs.contracts.sweep_events import append_event
from orchestrator.api.app import create_app
from orchestrator.controller.entrypoints import job_paths
from orchestrator.deployments.serve_status import ServeStatus
from orchestrator.deployments.serve_status import stats_key as stats_key_of
from orchestrator.local.head import LocalRayHead, free_port
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.bench.serving import write_checkpoint
from tests.support.servers import BackgroundServer
from workers.config import ModelConfig
from workers.waiting import wait_until

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
TOKEN = "deployments-token-0123456789"
RAY_TOKEN = "ray-token-" + "fedcba9876543210" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=64)
SERVING = {"num_cpus": 0, "limits": {"max_tokens": 16, "default_max_tokens": 4},
           "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "max_concurrent_batches": 1}}
# A deploy is a Ray job: a driver starts, imports torch, joins the cluster, runs serve.run (the first
# also starts Serve) and waits for the replica to load the checkpoint; tens of seconds on 2 busy cores.
DEPLOY_TIMEOUT_S = 240.0
POLL_S = 0.5
REQUEST_TIMEOUT_S = 60.0
# The head drains Serve for ~30 s when stopped; nothing of it is tested here, so it is then killed
# (the head's processes, found by its temp dir, go with it).
HEAD_DRAIN_S = 3.0


class Env:
    def __init__(self, head: LocalRayHead, tmp: Path, serve_port: int):
        self.head, self.tmp, self.serve_port = head, tmp, serve_port
        self.settings = Settings(api_token=TOKEN, state_dir=tmp / "state", ray_address=head.dashboard_url,
                                 ray_auth_token=RAY_TOKEN, serve_port=serve_port, deploy_interval_s=POLL_S,
                                 reconcile_interval_s=POLL_S)
        self.keys: dict[str, str] = {}  # deployment name -> its key
        self.ids: dict[str, str] = {}  # deployment name -> its id

    def store(self) -> Store:
        return Store(self.settings.database_url)

    def serve_apps(self) -> dict:
        return ServeStatus(self.head.dashboard_url, RAY_TOKEN, 30.0).applications()

    def ask(self, c: httpx.Client, name: str) -> str:
        d = c.get(f"/v1/deployments/{self.ids[name]}").json()
        client = openai.OpenAI(base_url=d["base_url"], api_key=self.keys[name], max_retries=0, timeout=REQUEST_TIMEOUT_S)
        out = client.completions.create(model=name, prompt="def ", max_tokens=4, temperature=0)
        assert out.model == name and out.usage.completion_tokens >= 1
        return out.choices[0].text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployments")
    head = LocalRayHead(num_cpus=2, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)})
    head.start()
    try:
        yield Env(head, tmp, free_port())
    finally:
        head.stop(timeout_s=HEAD_DRAIN_S)


def _wait_status(c: httpx.Client, deployment_id: str, statuses: set[str], timeout_s: float = DEPLOY_TIMEOUT_S,
                 seen_after: float = 0.0) -> dict:
    """The deployment once it is in one of ``statuses`` (404: gone), as the reconciler saw Serve
    after ``seen_after`` (a restarted service first shows what the previous one last saw)."""
    seen: dict = {}

    def reached() -> dict | None:
        r = c.get(f"/v1/deployments/{deployment_id}")
        seen.update(r.json() if r.status_code == 200 else {"status": r.status_code})
        fresh = r.status_code != 200 or (seen["checked_at"] or 0.0) > seen_after
        return seen if seen["status"] in statuses and fresh else None

    return wait_until(reached, timeout_s=timeout_s, interval_s=POLL_S,
                      what=lambda: f"deployment {deployment_id} to reach {statuses} (it is {seen})")


def _create(env: Env, c: httpx.Client, url: str, body: dict) -> dict:
    r = c.post(url, json=body)
    assert r.status_code == 201, r.text
    d = r.json()
    env.keys[d["name"]], env.ids[d["name"]] = d["api_key"], d["id"]
    return d


def test_create_over_rest_serves_and_shows_status_replicas_and_checkpoint(env):
    ckpt = write_checkpoint(env.tmp / "alpha", TINY, seed=0)
    with BackgroundServer(create_app(env.settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        created = _create(env, c, "/v1/deployments", {"name": "alpha", "spec": {"checkpoint": str(ckpt), **SERVING}})
        d = _wait_status(c, created["id"], {"RUNNING", "FAILED"})
        assert d["status"] == "RUNNING", d["message"]
        assert d["replicas"] == {"RUNNING": 1} and d["checkpoint"] == str(ckpt)
        assert d["base_url"] == f"http://127.0.0.1:{env.serve_port}/alpha/v1" and "api_key" not in d
        assert env.ask(c, "alpha")
        listed = c.get("/v1/deployments").json()
        assert [(x["name"], x["status"]) for x in listed["data"]] == [("alpha", "RUNNING")]
        # The dashboard's figures: the real replica answers the service's stats key (and for stats only).
        client = openai.OpenAI(base_url=d["base_url"], api_key=env.keys["alpha"], max_retries=0, timeout=REQUEST_TIMEOUT_S)
        for seed in range(3):  # sampled rows of several tokens: a time per output token to show
            client.completions.create(model="alpha", prompt="x", max_tokens=8, temperature=1.0, seed=seed)
        stats = c.get(f"/v1/deployments/{created['id']}/stats")
        assert stats.status_code == 200, stats.text
        [replica] = stats.json()["replicas"]
        assert replica["requests"] >= 1 and replica["ttft_ms_p50"] > 0 and replica["tpot_ms_p50"] > 0
        assert replica["queue_wait_ms_p50"] >= 0 and replica["completion_tokens_per_s"] > 0
        assert replica["requests_by_status"]["200"] >= 1 and replica["mean_batch_rows"] >= 1
        stats_key = {"Authorization": f"Bearer {stats_key_of(env.settings, created['id'])}"}
        assert httpx.get(f"{d['base_url']}/models", headers=stats_key, timeout=30).status_code == 401
    store = env.store()
    row = store.deployments.get(created["id"])
    store.close()
    assert row.spec["key_sha256"] == hashlib.sha256(created["api_key"].encode()).hexdigest()
    assert created["api_key"] not in (env.settings.state_dir / "orch.db").read_bytes().decode("latin-1")
    assert env.serve_apps()["alpha"].status == "RUNNING"


def test_another_team_can_neither_replace_nor_shadow_a_running_application(env):
    """Team cv, with its own roots and a checkpoint in them, tries every door to alpha's name and
    routes: a ``kind: serve`` job (which used to call serve.run under any name and prefix), the same
    name, ``/`` and a prefix nested in alpha's. Each is refused; alpha keeps answering its own key."""
    ckpt = write_checkpoint(env.tmp / "cv" / "ckpt", TINY, seed=3)
    with BackgroundServer(create_app(env.settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        assert c.put("/v1/teams/cv", json={"roots": [str(env.tmp / "cv")]}).status_code == 200
        token = c.post("/v1/tokens", json={"user": "mallory", "team": "cv"}).json()["token"]
        as_cv = {"Authorization": f"Bearer {token}"}
        job = {"kind": "serve", "spec": {"name": "alpha", "checkpoint": str(ckpt), "route_prefix": "/", **SERVING}}
        r = c.post("/v1/jobs", json=job, headers=as_cv)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "kind"], r.text
        assert "POST /v1/deployments" in r.json()["detail"][0]["msg"]
        for name, prefix in (("alpha", None), ("root", "/"), ("nested", "/alpha/v1")):
            spec = {"checkpoint": str(ckpt), **SERVING, **({"route_prefix": prefix} if prefix else {})}
            r = c.post("/v1/deployments", json={"name": name, "spec": spec}, headers=as_cv)
            assert r.status_code == 409, (name, prefix, r.text)
        assert c.get("/v1/jobs", headers=as_cv).json()["count"] == 0
        assert c.get("/v1/deployments", headers=as_cv).json()["count"] == 0
        assert env.ask(c, "alpha")
    assert set(env.serve_apps()) == {"alpha"}


def test_a_second_deployment_from_a_finished_job_leaves_the_first_serving(env):
    store = env.store()
    job, _ = store.jobs.create(kind="train", name="beta-run", spec={"name": "beta-run"}, max_retries=0)
    store.close()
    out = job_paths(env.settings.job_root, job.id).out
    ckpt = write_checkpoint(out / "ray-train" / "step-00000010", TINY, seed=1)
    app = create_app(env.settings.model_copy(update={"controller_enabled": True}))
    for state in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED):
        app.state.store.jobs.transition(job.id, state, "test: a training job that ran", new_attempt=state is JobState.STARTING)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        created = _create(env, c, "/v1/deployments", {"job_id": job.id, "name": "beta", "spec": SERVING})
        assert created["checkpoint"] == str(ckpt) and created["source"] == f"job {job.id}"
        assert _wait_status(c, created["id"], {"RUNNING", "FAILED"})["status"] == "RUNNING"
        assert env.ask(c, "beta") and env.ask(c, "alpha")  # both answer, each with its own key
        assert {x["name"]: x["status"] for x in c.get("/v1/deployments").json()["data"]} == {
            "alpha": "RUNNING", "beta": "RUNNING"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{env.serve_port}/alpha/v1", api_key=env.keys["beta"],
                      max_retries=0).models.list()


def test_a_restarted_service_redeploys_what_was_deleted_behind_its_back(env):
    gcs = f"127.0.0.1:{env.head.gcs_port}"
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--delete", "alpha"], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "RAY_ADDRESS": gcs, "RAY_AUTH_MODE": "token",
                                                       "RAY_AUTH_TOKEN": RAY_TOKEN})
    assert proc.returncode == 0 and "deleted application alpha" in proc.stdout, proc.stderr
    assert "alpha" not in env.serve_apps() and "beta" in env.serve_apps()
    restarted_at = time.time()
    with BackgroundServer(create_app(env.settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        d = _wait_status(c, env.ids["alpha"], {"RUNNING", "FAILED"}, seen_after=restarted_at)
        assert d["status"] == "RUNNING", d["message"]
        assert env.ask(c, "alpha") and env.ask(c, "beta")  # the same key still opens it
    store = env.store()
    assert store.deployments.get(env.ids["alpha"]).deploys == 2 and store.deployments.get(env.ids["beta"]).deploys == 1
    store.close()


def test_delete_removes_one_application_and_the_others_keep_serving(env):
    with BackgroundServer(create_app(env.settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        r = c.delete(f"/v1/deployments/{env.ids['beta']}")
        assert r.status_code == 202 and r.json()["status"] == "DELETING"
        assert _wait_status(c, env.ids["beta"], {404})["status"] == 404
        assert "beta" not in env.serve_apps()
        assert env.ask(c, "alpha")
        actions = [e["action"] for e in c.get("/v1/audit").json()["data"] if e["target"] == env.ids["beta"]]
        assert actions == ["deployment.delete", "deployment.create"]


def test_promote_serves_the_best_trial_of_a_finished_sweep(env):
    store = env.store()
    spec = {"name": "sw", "trials": 2, "space": {"train.lr": {"type": "choice", "values": [0.001, 0.002]}},
            "base": {"name": "b", "train": {"steps": 20}}}
    job, _ = store.jobs.create(kind="sweep", name="sw", spec=spec, max_retries=0)
    store.close()
    out = job_paths(env.settings.job_root, job.id).out
    ckpts = {t: write_checkpoint(out / "trials" / t / "train" / "step-00000020", TINY, seed=i)
             for i, t in enumerate(("t1", "t2"))}
    for trial, loss in (("t1", 1.2), ("t2", 3.4)):
        append_event(out, "start", trial, parameters={"train.lr": 0.001})
        append_event(out, "result", trial, metrics={"step": 20, "loss": loss, "checkpoint": str(ckpts[trial])})
        append_event(out, "complete", trial, state="SUCCEEDED")
    app = create_app(env.settings)
    for state in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED):
        app.state.store.jobs.transition(job.id, state, "test: a sweep that ran", new_attempt=state is JobState.STARTING)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        created = _create(env, c, f"/v1/sweeps/{job.id}/promote", {"name": "best", "spec": SERVING})
        assert created["checkpoint"] == str(ckpts["t1"]) and created["source"] == f"sweep {job.id} trial t1"
        assert _wait_status(c, created["id"], {"RUNNING", "FAILED"})["status"] == "RUNNING"
        assert env.ask(c, "best") and env.ask(c, "alpha")
