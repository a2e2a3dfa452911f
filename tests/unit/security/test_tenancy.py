"""Tenant isolation at the front door, over the real app with a real store file and two teams with
real tokens: serving goes through deployments only, a team's job runs confined to its roots, a
grid sweep cannot expand without bound. (End to end with a real Serve application:
tests/integration/serving/test_deployments.py; with a real training run: tests/integration/security/test_data_confinement.py.)"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from jobs.specs.base import SpecError
from jobs.specs.sweep import MAX_TRIALS, validate_sweep_spec
from orchestrator.api.app import create_app
from orchestrator.controller.entrypoints import DATA_ROOTS_ENV, job_paths
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from tests.support.fakes import FakeRay
from workers.waiting import wait_until

TOKEN = "tenancy-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"name": "tiny", "model": {"n_layers": 1, "d_model": 32, "n_heads": 2}, "train": {"steps": 4}}


@pytest.fixture
def env(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=None, reconcile_interval_s=0.05)
    ray = FakeRay(auto_run=False)
    ray.node_list = [*ray.node_list, NodeView("n3", "127.0.0.3", False, "ALIVE", {"CPU": 64.0, "memory": 64e9})]
    app = create_app(settings, ray=ray)
    with TestClient(app) as client:
        (tmp_path / "nlp").mkdir()
        assert client.put("/v1/teams/nlp", json={"roots": [str(tmp_path / "nlp"), "s3://bucket/nlp"]},
                          headers=AUTH).status_code == 200
        tokens = {}
        for user, team in (("alice", "nlp"), ("carol", "cv")):
            r = client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH)
            tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
        yield app, client, ray, tokens, tmp_path
    app.state.store.close()


@pytest.mark.parametrize("who", ["alice", "admin"])
def test_a_serve_spec_is_never_a_plain_job(env, who):
    """``kind: serve`` through /v1/jobs called serve.run under any name and route prefix, replacing
    another team's application. Serving goes through /v1/deployments only, for every principal."""
    app, client, _, tokens, tmp = env
    headers = AUTH if who == "admin" else tokens["alice"]
    body = {"kind": "serve", "spec": {"name": "their-app", "checkpoint": str(tmp / "nlp"), "route_prefix": "/"}}
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "kind"] and "POST /v1/deployments" in error["msg"]
    assert app.state.store.jobs.list()[1] == 0


def _runtime_env(ray: FakeRay, job_id: str) -> dict:
    wait_until(lambda: any(s["metadata"]["orch_job_id"] == job_id for s in ray.submissions), timeout_s=20,
               interval_s=0.05, what=f"job {job_id} to be submitted to Ray")
    return next(s["runtime_env"] for s in ray.submissions if s["metadata"]["orch_job_id"] == job_id)


def test_a_teams_job_runs_confined_to_its_roots_and_its_own_folder(env):
    app, client, ray, tokens, tmp = env
    alice = client.post("/v1/jobs", json={"spec": TINY}, headers=tokens["alice"]).json()["id"]
    carol = client.post("/v1/jobs", json={"spec": TINY}, headers=tokens["carol"]).json()["id"]
    admin = client.post("/v1/jobs", json={"spec": TINY}, headers=AUTH).json()["id"]
    job_root = app.state.settings.job_root
    # Local roots only (object stores have no links); the job's own folder holds its checkpoints.
    assert json.loads(_runtime_env(ray, alice)["env_vars"][DATA_ROOTS_ENV]) == [
        str(tmp / "nlp"), str(job_paths(job_root, alice).root)]
    # A team with no roots: its own folder only (the defaults the service picks are allowed by the job).
    assert json.loads(_runtime_env(ray, carol)["env_vars"][DATA_ROOTS_ENV]) == [str(job_paths(job_root, carol).root)]
    assert DATA_ROOTS_ENV not in _runtime_env(ray, admin)["env_vars"]


def test_a_grid_larger_than_the_trial_limit_is_refused():
    values = [round(0.001 * (i + 1), 6) for i in range(200)]
    space = {"train.lr": {"type": "choice", "values": values}, "seed": {"type": "choice", "values": list(range(200))}}
    with pytest.raises(SpecError, match=f"grid expands to 40000 trials, more than the limit of {MAX_TRIALS}"):
        validate_sweep_spec({"search": "grid", "space": space, "base": {"train": {"steps": 40}}})
    small = {"train.lr": {"type": "choice", "values": values[:10]}, "seed": {"type": "choice", "values": [0, 1]}}
    assert validate_sweep_spec({"search": "grid", "space": small, "base": {"train": {"steps": 40}}}).n_trials == 20
