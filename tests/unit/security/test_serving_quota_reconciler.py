"""The deployment reconciler deploys only what the scheduler admitted, and confines a team's deploy
to its data roots (issue #20, point 3 and point 2's serving side). One pass at a time, against the
real app and store, a fake Ray and a scripted Serve; the scheduler's step is the controller's
(``Scheduler.plan`` over the stored deployments, recorded with ``store.deployments.record_queue``).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from jobs.specs.serve import ServeSpec
from orchestrator.api.app import create_app
from orchestrator.deployments.reconciler import DeploymentReconciler
from orchestrator.ray_client import NodeView
from orchestrator.scheduler.service import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import DeploymentStatus, deploy_submission_id
from tests.support.fakes import FakeRay

TOKEN = "serving-quota-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class NoApps:
    """Serve with no application yet (nothing here is deployed for real)."""

    def applications(self):
        return {}


@pytest.fixture
def env(tmp_path):
    # No controller thread: each test runs the scheduler's step itself, between reconciler passes.
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", controller_enabled=False, ray_address=None)
    ray = FakeRay()  # submitted deploy jobs stay PENDING
    app = create_app(settings, ray=ray)
    with TestClient(app) as client:
        yield client, app.state.store, ray, DeploymentReconciler(app.state.store, ray, NoApps(), settings), settings
    app.state.store.close()


def _schedule(store, ray, settings):
    """The controller's scheduling step for deployments: one pass, its decisions recorded."""
    quotas = {name: team.quotas for name, team in store.teams.all().items() if team.quotas}
    scheduler = Scheduler(settings)
    decisions = scheduler.plan([], ray, quotas, store.deployments.list()[0])
    store.deployments.record_queue([a.job_id for a in decisions.serving_admit],
                                   [(w.job_id, w.reason) for w in decisions.serving_wait])
    return scheduler


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": 1, "model": {}}))
    return str(path)


def _create(client, headers, checkpoint, name):
    r = client.post("/v1/deployments", json={"name": name, "spec": {"checkpoint": checkpoint}}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_deployment_the_scheduler_has_not_admitted_is_never_deployed(env, tmp_path):
    client, store, ray, reconciler, settings = env
    store.teams.put("admin", quotas={"cpu": 1.0})  # one 1-CPU replica
    first = _create(client, AUTH, _checkpoint(tmp_path / "a"), "first")
    second = _create(client, AUTH, _checkpoint(tmp_path / "b"), "second")
    assert store.deployments.get(first).status is DeploymentStatus.QUEUED
    reconciler.reconcile_once()
    assert ray.submissions == []  # stored is not admitted

    _schedule(store, ray, settings)
    reconciler.reconcile_once()
    assert [s["submission_id"] for s in ray.submissions] == [deploy_submission_id(first, 1)]
    waiting = store.deployments.get(second)
    assert waiting.status is DeploymentStatus.QUEUED and waiting.deploys == 0
    assert waiting.message == ("waiting for quota: team admin quota for cpu is 1 devices; it holds 1 and this one "
                               "needs 1; 0 jobs ahead")
    reconciler.reconcile_once()
    assert len(ray.submissions) == 1

    assert client.delete(f"/v1/deployments/{first}", headers=AUTH).status_code == 202
    reconciler.reconcile_once()  # stops the deploy still running
    reconciler.reconcile_once()  # then drops the row: its replicas hold nothing any more
    _schedule(store, ray, settings)
    reconciler.reconcile_once()
    assert [s["submission_id"] for s in ray.submissions] == [deploy_submission_id(first, 1),
                                                             deploy_submission_id(second, 1)]
    assert store.deployments.get(second).status is DeploymentStatus.DEPLOYING


def test_a_queued_deployment_deleted_while_it_waits_goes_without_a_deploy(env, tmp_path):
    client, store, ray, reconciler, settings = env
    store.teams.put("admin", quotas={"cpu": 0.5})  # less than one replica: it waits
    queued = _create(client, AUTH, _checkpoint(tmp_path / "a"), "waits")
    _schedule(store, ray, settings)
    assert "waiting for quota" in client.get(f"/v1/deployments/{queued}", headers=AUTH).json()["message"]
    assert client.delete(f"/v1/deployments/{queued}", headers=AUTH).status_code == 202
    _schedule(store, ray, settings)  # a delete asked meanwhile is not undone by the scheduler
    assert store.deployments.get(queued).status is DeploymentStatus.DELETING
    reconciler.reconcile_once()
    assert store.deployments.list()[1] == 0 and ray.submissions == [] and ray.stops == []


def test_a_teams_deploy_is_confined_to_its_roots_and_the_admins_is_not(env, tmp_path):
    client, store, ray, reconciler, settings = env
    nlp = tmp_path / "nlp"
    store.teams.put("nlp", roots=[str(nlp), "s3://bucket/nlp"])
    token = client.post("/v1/tokens", json={"user": "alice", "team": "nlp"}, headers=AUTH).json()["token"]
    ckpt = _checkpoint(nlp / "run" / "step-00000001")
    mine = _create(client, {"Authorization": f"Bearer {token}"}, ckpt, "alices")
    admins = _create(client, AUTH, _checkpoint(tmp_path / "admin"), "admins")
    _schedule(store, ray, settings)
    reconciler.reconcile_once()
    env_vars = {s["metadata"]["orch_deployment_id"]: s["runtime_env"]["env_vars"] for s in ray.submissions}
    assert json.loads(env_vars[mine]["ORCH_DATA_ROOTS"]) == [str(nlp), ckpt]  # local roots only, and its checkpoint
    assert "ORCH_DATA_ROOTS" not in env_vars[admins]


def test_without_a_cpu_pool_replicas_are_booked_where_the_cpus_are(env, tmp_path):
    client, store, ray, reconciler, settings = env
    ray.node_list = [NodeView("g", "127.0.0.1", True, "ALIVE", {"CPU": 8.0, "GPU": 1.0})]  # a GPU workstation
    deployment = _create(client, AUTH, _checkpoint(tmp_path / "a"), "workstation")
    scheduler = _schedule(store, ray, settings)
    assert store.deployments.get(deployment).status is DeploymentStatus.PENDING
    assert scheduler.snapshot.decisions.reserved == {"gpu": {"CPU": 1.0}}
    assert scheduler.snapshot.teams["admin"].serving == {"CPU": 1.0}
    assert scheduler.deployment_refusal(ServeSpec(checkpoint="/c", num_cpus=8)) is None
    assert scheduler.deployment_refusal(ServeSpec(checkpoint="/c", num_cpus=9))[0] == ("num_cpus",)
    reconciler.reconcile_once()
    assert [s["submission_id"] for s in ray.submissions] == [deploy_submission_id(deployment, 1)]
