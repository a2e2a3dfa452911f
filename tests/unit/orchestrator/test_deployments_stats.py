"""GET /v1/deployments/{id}/stats: the replicas' serving figures through the control plane, scoped
to the team like every deployment route, read with the service's own stats key (derived from its
API token; the spec holds only its hash), never the deployment's bearer key. Replicas: a fake that
checks the key (tests/support/serving_fakes.py); the real replica: tests/integration/serving/test_deployments.py."""

from __future__ import annotations

import json

import pytest

from orchestrator.deployments.serve_status import stats_key
from orchestrator.store import DeploymentStatus
from tests.support.control_plane import AUTH
from tests.support.servers import BackgroundServer
from tests.support.serving_fakes import FakeReplicas, figures


@pytest.fixture
def replicas():
    fake = FakeReplicas()
    with BackgroundServer(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def settings(settings, replicas):
    return settings.model_copy(update={"controller_enabled": False, "serve_url": replicas.url})


def _running(client, app, tmp_path, replicas_running: int = 2) -> dict:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"format": 1, "step": 10, "model": {}}))
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": str(ckpt), "num_cpus": 0}}, headers=AUTH)
    assert r.status_code == 201, r.text
    d = r.json()
    app.state.store.deployments.update(d["id"], status=DeploymentStatus.RUNNING, replicas={"RUNNING": replicas_running})
    return d


def test_stats_gather_each_running_replica_once_with_the_services_key(client, app, tmp_path, replicas):
    d = _running(client, app, tmp_path)
    assert d["spec"]["stats_key_sha256"] and d["spec"]["stats_key_sha256"] != d["spec"]["key_sha256"]
    replicas.key_sha256 = d["spec"]["stats_key_sha256"]
    replicas.answers = {"r-b": figures("r-b", ttft_ms_p50=20.0), "r-a": figures("r-a")}
    r = client.get(f"/v1/deployments/{d['id']}/stats", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "RUNNING" and body["message"] is None
    assert [x["replica"] for x in body["replicas"]] == ["r-a", "r-b"]  # two asks, one per replica
    assert body["replicas"][1]["ttft_ms_p50"] == 20.0 and body["replicas"][0]["requests_by_status"] == {"200": 7, "422": 1}
    # The key is the service's own: derived, not stored, and not the deployment's bearer key.
    key = stats_key(app.state.settings, d["id"])
    assert key not in (app.state.settings.state_dir / "orch.db").read_bytes().decode("latin-1")
    assert d["api_key"] != key


def test_stats_are_scoped_to_the_team_and_say_why_there_are_none(client, app, tmp_path, replicas):
    d = _running(client, app, tmp_path)
    carol = client.post("/v1/tokens", json={"user": "carol", "team": "cv"}, headers=AUTH).json()["token"]
    r = client.get(f"/v1/deployments/{d['id']}/stats", headers={"Authorization": f"Bearer {carol}"})
    assert r.status_code == 404 and replicas.asks == 0
    app.state.store.deployments.update(d["id"], status=DeploymentStatus.DEPLOYING)
    r = client.get(f"/v1/deployments/{d['id']}/stats", headers=AUTH)
    assert r.status_code == 200 and r.json()["replicas"] == [] and "DEPLOYING" in r.json()["message"]
    assert replicas.asks == 0


def test_a_refused_or_missing_replica_is_a_503_saying_which(client, app, tmp_path, replicas):
    d = _running(client, app, tmp_path, replicas_running=1)
    replicas.key_sha256 = "0" * 64  # deployed under another API token
    r = client.get(f"/v1/deployments/{d['id']}/stats", headers=AUTH)
    assert r.status_code == 503 and "stats key" in r.json()["detail"]
    app.state.store.deployments.update(d["id"], status=DeploymentStatus.RUNNING)
    app.state.settings.__dict__["serve_base_url"] = "http://127.0.0.1:9"  # nothing listens there
    r = client.get(f"/v1/deployments/{d['id']}/stats", headers=AUTH)
    assert r.status_code == 503 and "did not answer" in r.json()["detail"]


def test_a_client_cannot_set_the_stats_key(client, tmp_path):
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": str(tmp_path), "stats_key_sha256": "a" * 64}},
                    headers=AUTH)
    assert r.status_code == 422 and ["body", "spec", "stats_key_sha256"] in [e["loc"] for e in r.json()["detail"]]
