"""Queued demand reaches Ray's autoscaler: a local head with the fake multi-node provider (autoscaler
v1, as `orch up --autoscale` starts it) and no CPUs of its own; a job the scheduler holds QUEUED gets a
pending placement group, a fake node starts for it, the job (the fake entry point, its driver
reserving a CPU) runs on that node, and the node is removed once idle. Every wait is bounded; the
head and every fake node's processes are ended even when the test fails."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from orchestrator.api.app import create_app
from orchestrator.local.autoscale import FakeNodes, FakeWorkerType
from orchestrator.local.head import LocalRayHead
from orchestrator.settings import Settings
from tests.support.serve_app import FAKE_ENTRYPOINTS
from tests.support.servers import BackgroundServer
from workers.waiting import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.fresh_process]

REPO = Path(__file__).resolve().parents[3]
TOKEN = "autoscale-token-0123456789"
RAY_TOKEN = "ray-token-" + "fedcba9876543210" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# One worker (1 CPU) + Ray Data's CPU: one fake node of 2 logical CPUs holds it; the node also offers
# a custom resource the job's driver reserves (Ray Jobs takes no CPU in entrypoint_resources), so the
# driver can run nowhere else.
NODE_CPUS = 2
DRIVER_SLOT = "fake_node_driver"
SPEC = {"name": "scale-up", "data": {"max_bytes": 200_000}, "model": {"n_layers": 1, "d_model": 32, "n_heads": 2},
        "train": {"steps": 6, "batch_size": 2, "log_every": 1}, "resources": {"num_workers": 1}}
NODE_UP_TIMEOUT_S = 240.0  # a fake node is a raylet and its workers starting on 2 busy cores
JOB_TIMEOUT_S = 180.0
IDLE_TIMEOUT_MINUTES = 0.25  # the schema takes a number: 15 s
NODE_DOWN_TIMEOUT_S = 180.0  # the idle timeout, then the autoscaler's next look and the raylet's exit


def _state(head: LocalRayHead, resource: str) -> list:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=head.dashboard_url, headers=head.auth_headers)
    return client.list(StateResource(resource), options=ListApiOptions(detail=True), raise_on_missing_output=False)


def _alive_workers(head: LocalRayHead) -> list:
    """Alive nodes other than the head."""
    return [n for n in _state(head, "nodes") if n.state == "ALIVE" and not n.is_head_node]


def _demand_groups(head: LocalRayHead) -> list:
    return [g for g in _state(head, "placement_groups") if g.name.startswith("orch-demand-") and g.state != "REMOVED"]


@pytest.fixture
def autoscaling_head(monkeypatch):
    import ray

    assert not ray.is_initialized()  # the demand driver must join this cluster, not another
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):  # the demand driver sets these: restored after
        monkeypatch.delenv(var, raising=False)
    nodes = FakeNodes(workers=(FakeWorkerType(name="ray.worker.cpu2", cpus=NODE_CPUS, max_workers=1,
                                              resources={DRIVER_SLOT: 1}),),
                      idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    head = LocalRayHead(num_cpus=0, auth_token=RAY_TOKEN, env={"PYTHONPATH": str(REPO)}, fake_nodes=nodes)
    try:
        head.start()
        yield head, nodes
    finally:
        head.stop()  # also ends the fake nodes' raylets, found by the head's temp dir


def test_a_queued_job_starts_a_fake_node_runs_on_it_and_the_idle_node_goes(autoscaling_head, tmp_path):
    head, nodes = autoscaling_head
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=head.dashboard_url,
                        ray_auth_token=RAY_TOKEN, ray_gcs_address=head.gcs_address, reconcile_interval_s=0.5,
                        driver_resources={DRIVER_SLOT: 1.0}, autoscaler_max_extra=nodes.max_extra())
    assert settings.autoscaler_max_extra == {"cpu": {"CPU": float(NODE_CPUS), DRIVER_SLOT: 1.0}}
    assert _alive_workers(head) == []
    app = create_app(settings, entrypoints=FAKE_ENTRYPOINTS)
    spec = SPEC | {"data": SPEC["data"] | {"path": str(tmp_path / "data")}}
    with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        r = c.post("/v1/jobs", json={"spec": spec})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["queue_reason"], timeout_s=60, interval_s=0.25,
                   what="the job to wait in the queue")
        [group] = wait_until(lambda: _demand_groups(head), timeout_s=60, interval_s=0.5,
                             what="the queued job's demand group")
        assert group.name == f"orch-demand-{job_id}" and len(group.bundles) == 3
        [node] = wait_until(lambda: _alive_workers(head), timeout_s=NODE_UP_TIMEOUT_S, interval_s=1.0,
                            what="the autoscaler to start a fake node for the queued job")
        assert node.resources_total["CPU"] == NODE_CPUS

        def ended() -> dict | None:
            job = c.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

        job = wait_until(ended, timeout_s=JOB_TIMEOUT_S, interval_s=0.5, what=f"job {job_id} to end")
        assert job["state"] == "SUCCEEDED", job["message"]
        assert job["metrics"]["step"] == 6 and job["attempts"] == 1
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers).get_job_info(job["ray_submission_id"])
        assert info.driver_node_id == node.node_id  # its driver's resource is on no other node
        assert _demand_groups(head) == []  # withdrawn at admission
        wait_until(lambda: _alive_workers(head) == [], timeout_s=NODE_DOWN_TIMEOUT_S, interval_s=2.0,
                   what="the idle fake node to be removed")
