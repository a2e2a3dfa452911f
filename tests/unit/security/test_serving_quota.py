"""Serving counts against quotas and capacity (issue #20, point 3): two teams with their own tokens,
roots and quotas on the real app, its controller thread and a real store, against a fake Ray. A
deployment's replicas (max_replicas x num_cpus) hold their team's quota and the pools' room like
a job's workers; one that does not fit waits QUEUED with its reason, one that never can is a 422
naming the field; /v1/cluster and `orch cluster` show what each team's serving holds.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.cli.cluster import team_rows
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from tests.support.control_plane import TINY_SPEC
from tests.support.fakes import FakeRay
from workers.waiting import wait_until

TOKEN = "serving-quota-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 20.0
POLL_S = 0.02
CPU_POOL = 8.0  # the head's CPUs: the only cpu pool, where replicas are booked


@pytest.fixture
def served(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.05, ray_address=None)
    ray = FakeRay()
    ray.node_list = [NodeView("head", "127.0.0.1", True, "ALIVE", {"CPU": CPU_POOL}),
                     NodeView("g", "127.0.0.2", False, "ALIVE", {"CPU": 16.0, "GPU": 4.0})]
    app = create_app(settings, ray=ray)
    with TestClient(app) as client:
        wait_until(lambda: app.state.controller.scheduler.snapshot, timeout_s=DEADLINE_S, interval_s=POLL_S,
                   what="the controller's first pass")
        yield client, app
    app.state.store.close()


@pytest.fixture
def teams(served, tmp_path):
    """alice (team nlp, quota 3 CPUs) and carol (team cv, quota 4 CPUs), each with a data root
    holding a checkpoint: team -> (headers, checkpoint)."""
    client, _ = served
    made = {}
    for user, team, quota in (("alice", "nlp", 3.0), ("carol", "cv", 4.0)):
        ckpt = tmp_path / team / "ckpt"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"format": 1, "step": 1, "model": {}}))
        r = client.put(f"/v1/teams/{team}", json={"roots": [str(tmp_path / team)], "quotas": {"cpu": quota}},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        token = client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH).json()["token"]
        made[team] = ({"Authorization": f"Bearer {token}"}, str(ckpt))
    return made


def _deploy(client, team, name, **spec):
    headers, ckpt = team
    r = client.post("/v1/deployments", json={"name": name, "spec": {"checkpoint": ckpt, **spec}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _settled(client, headers, deployment_id):
    """The deployment once the scheduler has decided: admitted (PENDING), or QUEUED with its reason."""
    def decided():
        d = client.get(f"/v1/deployments/{deployment_id}", headers=headers).json()
        return d if d["status"] == "PENDING" or "ahead" in (d["message"] or "") else None
    return wait_until(decided, timeout_s=DEADLINE_S, interval_s=POLL_S, what=f"a decision on {deployment_id}")


def test_replicas_count_against_their_teams_quota_and_only_theirs(served, teams):
    client, app = served
    nlp, cv = teams["nlp"], teams["cv"]
    first = _deploy(client, nlp, "nlp-a", autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert client.get(f"/v1/deployments/{first}", headers=nlp[0]).json()["status"] in ("QUEUED", "PENDING")
    assert _settled(client, nlp[0], first)["status"] == "PENDING"  # 2 replicas x 1 CPU: within 3
    second = _deploy(client, nlp, "nlp-b", num_cpus=2)
    waiting = _settled(client, nlp[0], second)
    assert waiting["status"] == "QUEUED"
    assert waiting["message"] == ("waiting for quota: team nlp quota for cpu is 3 devices; it holds 2 and this one "
                                  "needs 2; 0 jobs ahead")
    theirs = _deploy(client, cv, "cv-a", num_cpus=3)  # another team's quota is its own
    assert _settled(client, cv[0], theirs)["status"] == "PENDING"

    # A training job of nlp (2 CPUs) now waits: its team's serving holds the quota.
    r = client.post("/v1/jobs", json={"spec": {**TINY_SPEC, "resources": {"num_workers": 1}}}, headers=nlp[0])
    assert r.status_code == 202, r.text
    job = wait_until(lambda: client.get(f"/v1/jobs/{r.json()['id']}", headers=nlp[0]).json()["queue_reason"],
                     timeout_s=DEADLINE_S, interval_s=POLL_S, what="the job's queue reason")
    assert job.startswith("waiting for quota: team nlp quota for cpu is 3 devices; it holds 2 and this one needs 2")

    mine = client.get("/v1/cluster", headers=nlp[0]).json()
    assert mine["teams"] == {"nlp": {"jobs": {}, "serving": {"CPU": 2.0}, "deployments": 1, "queued_deployments": 1}}
    assert mine["pools"]["cpu"]["reserved"] == {"CPU": 5.0}  # nlp's 2 and cv's 3: what the pool has left is 3
    every = client.get("/v1/cluster", headers=AUTH).json()["teams"]
    assert every["cv"] == {"jobs": {}, "serving": {"CPU": 3.0}, "deployments": 1, "queued_deployments": 0}
    assert set(every) == {"nlp", "cv"}
    assert [row[:3] for row in team_rows(every)] == [["cv", "-", "CPU=3"], ["nlp", "-", "CPU=2"]]

    # Its first deployment deleted (no reconciler here: never deployed, so it holds nothing at once),
    # the waiting one is admitted.
    assert client.delete(f"/v1/deployments/{first}", headers=nlp[0]).status_code == 202
    wait_until(lambda: client.get(f"/v1/deployments/{second}", headers=nlp[0]).json()["status"] == "PENDING",
               timeout_s=DEADLINE_S, interval_s=POLL_S, what="the waiting deployment admitted")


def test_a_deployment_waits_for_room_in_the_pools(served, teams):
    client, app = served
    app.state.store.teams.put("cv", quotas={})  # no quota: only the pool's room bounds it
    big = _deploy(client, teams["cv"], "big", num_cpus=3, autoscaling={"max_replicas": 2})
    assert _settled(client, teams["cv"][0], big)["status"] == "PENDING"
    later = _deploy(client, teams["cv"], "later", num_cpus=3)
    d = _settled(client, teams["cv"][0], later)
    assert (d["status"], d["message"]) == ("QUEUED", "waiting for 1 CPU in pool cpu; 0 jobs ahead")
    # The team's next job (2 CPUs, which are free) waits behind it: the queue's head holds its pool.
    headers = teams["cv"][0]
    r = client.post("/v1/jobs", json={"spec": {**TINY_SPEC, "resources": {"num_workers": 1}}}, headers=headers)
    reason = wait_until(lambda: client.get(f"/v1/jobs/{r.json()['id']}", headers=headers).json()["queue_reason"],
                        timeout_s=DEADLINE_S, interval_s=POLL_S, what="the job's queue reason")
    assert reason.startswith(f"waiting behind job {later}")


@pytest.mark.parametrize(("spec", "loc"), [
    ({"autoscaling": {"max_replicas": 9}}, ["body", "spec", "autoscaling", "max_replicas"]),
    ({"num_cpus": 9}, ["body", "spec", "num_cpus"]),
])
def test_replicas_the_cluster_can_never_hold_are_a_422_naming_the_field(served, teams, spec, loc):
    client, app = served
    headers, ckpt = teams["nlp"]
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": ckpt, **spec}}, headers=headers)
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == loc and "the deployment can never run on this cluster" in err["msg"], err
    assert "pool cpu can hold at most 8 CPU; the deployment needs 9 CPU there" in err["msg"]
    assert app.state.store.deployments.list()[1] == 0  # nothing stored
