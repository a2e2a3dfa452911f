"""``/metrics`` by who asks (issue #20, point 7): a user's token sees its team's jobs only (their ids,
losses and counts), an admin everything, and a ``scrape`` token (made for Prometheus) everything
on ``/metrics`` and nothing anywhere else. Two teams with real tokens, the real app with its
controller thread and a real store; a fake Ray reports the jobs RUNNING with a progress line."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from orchestrator.store import submission_id_for
from tests.support.control_plane import TINY_SPEC
from tests.support.fakes import FakeRay, progress_line
from workers.waiting import wait_until

TOKEN = "metrics-scope-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 20.0
POLL_S = 0.02


@pytest.fixture
def env(tmp_path):
    """(client, tokens by user, job id by team): one RUNNING job each for teams nlp and cv."""
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 64.0, "memory": 64e9})]
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.02,
                              metrics_interval_s=0.02, ray_address=None), ray=ray)
    with TestClient(app) as client:
        tokens = {}
        for user, team, role in (("alice", "nlp", "user"), ("carol", "cv", "user"), ("prometheus", "admin", "scrape")):
            r = client.post("/v1/tokens", json={"user": user, "team": team, "role": role}, headers=AUTH)
            assert r.status_code == 201, r.text
            tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
        jobs = {}
        for user, team, loss in (("alice", "nlp", 1.25), ("carol", "cv", 7.5)):
            # Stored as a submit stores it (the route is tested elsewhere); the controller runs it.
            job_id = app.state.store.jobs.create(kind="train", name="tiny", spec=TINY_SPEC, max_retries=0,
                                                 team=team, owner=user)[0].id
            sid = submission_id_for(job_id, 1)
            wait_until(lambda sid=sid: sid in ray.jobs, timeout_s=DEADLINE_S, interval_s=POLL_S, what=f"{sid} at Ray")
            ray.job_logs[sid] = progress_line(3, 100, loss) + "\n"
            ray.set(sid, "RUNNING")
            jobs[team] = job_id
        wait_until(lambda: all(f'job_id="{j}"' in client.get("/metrics", headers=AUTH).text for j in jobs.values()),
                   timeout_s=DEADLINE_S, interval_s=POLL_S, what="both jobs' loss in /metrics")
        yield client, tokens, jobs
    app.state.store.close()


def _sample(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", text, re.M) if labels else \
        re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_a_users_token_sees_only_its_teams_jobs(env):
    client, tokens, jobs = env
    r = client.get("/metrics", headers=tokens["alice"])
    assert r.status_code == 200
    assert _sample(r.text, "orch_job_loss", job_id=jobs["nlp"]) == 1.25
    assert jobs["cv"] not in r.text  # neither its id nor any of its series
    assert _sample(r.text, "orch_jobs", state="RUNNING") == 1.0  # its team's count, not the service's
    assert _sample(r.text, "orch_reconcile_iterations_total") is not None  # service-wide figures stay
    r = client.get("/metrics", headers=tokens["carol"])
    assert _sample(r.text, "orch_job_loss", job_id=jobs["cv"]) == 7.5 and jobs["nlp"] not in r.text


@pytest.mark.parametrize("who", ["admin", "prometheus"])
def test_an_admin_and_a_scrape_token_see_every_team(env, who):
    client, tokens, jobs = env
    text = client.get("/metrics", headers=AUTH if who == "admin" else tokens[who]).text
    assert _sample(text, "orch_job_loss", job_id=jobs["nlp"]) == 1.25
    assert _sample(text, "orch_job_loss", job_id=jobs["cv"]) == 7.5
    assert _sample(text, "orch_jobs", state="RUNNING") == 2.0


def test_a_scrape_token_reads_metrics_and_nothing_else(env):
    client, tokens, jobs = env
    scrape = tokens["prometheus"]
    for method, path in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{jobs['nlp']}"), ("GET", "/v1/cluster"),
                         ("GET", "/openapi.json"), ("GET", "/v1/audit"), ("POST", "/v1/jobs"),
                         ("GET", "/v1/tokens"), ("GET", "/no/such/path")):
        r = client.request(method, path, headers=scrape, json={"spec": TINY_SPEC})
        assert (r.status_code, r.json()["detail"]) == (403, "a scrape token may read /metrics only"), (method, path)
    assert client.get("/v1/jobs", headers=AUTH).json()["count"] == 2  # its POST stored nothing
    assert client.get("/healthz").status_code == 200
