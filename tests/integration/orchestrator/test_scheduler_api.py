"""Scheduling through the real HTTP API with its controller thread, against a fake Ray: quotas under
concurrent submits, the submit-time refusal, the pools in /v1/cluster and `orch cluster`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from orchestrator.api.app import create_app
from orchestrator.ray_client import NodeView, UnmanagedJob
from orchestrator.states import JobState
from tests.support.control_plane import AUTH, TINY_SPEC
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer
from workers.waiting import wait_until

DEADLINE_S = 20.0
SUBMITS = 24
QUOTA_CPUS = 4.0  # the team's cpu quota: two tiny jobs (1 worker CPU + 1 Ray Data CPU each)
ACTIVE = {JobState.STARTING, JobState.RUNNING}


@pytest.fixture
def served(settings):
    ray = FakeRay()  # jobs stay PENDING in Ray: admitted ones keep their resources
    ray.node_list = [NodeView("head", "127.0.0.1", True, "ALIVE", {"CPU": 64.0}),
                     NodeView("g", "127.0.0.2", False, "ALIVE", {"CPU": 16.0, "GPU": 4.0},
                              {"ray.io/accelerator-type": "A100"})]
    ray.unmanaged = [UnmanagedJob("raysubmit_1", "07000000", "RUNNING", {"g": {"GPU": 1.0, "CPU": 1.0}})]
    app = create_app(settings, ray=ray)
    with BackgroundServer(app) as url:
        yield app, url
    app.state.store.close()


def test_team_quota_is_never_exceeded_under_concurrent_submits(served):
    app, url = served
    store = app.state.store
    store.teams.put("admin", quotas={"cpu": QUOTA_CPUS})
    body = {"spec": {**TINY_SPEC, "resources": {"num_workers": 1}}, "max_retries": 0}
    seen_active: list[int] = []

    async def post_all():
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as c:
            return await asyncio.gather(*(c.post("/v1/jobs", json=body, headers=AUTH) for _ in range(SUBMITS)))

    # In a thread of its own: a browser test earlier in the session may leave this thread's loop running.
    with ThreadPoolExecutor(1) as pool:
        responses = pool.submit(asyncio.run, post_all()).result()
    assert {r.status_code for r in responses} == {202}

    def settled() -> bool:
        jobs, _ = store.jobs.list(limit=SUBMITS)
        seen_active.append(sum(j.state in ACTIVE for j in jobs))
        return all(j.state in ACTIVE or j.queue_reason for j in jobs)

    wait_until(settled, timeout_s=DEADLINE_S, interval_s=0.02, what="every job admitted or queued with a reason")
    assert max(seen_active) == 2 and seen_active[-1] == 2  # 2 x 2 CPUs = the quota, never more
    jobs, _ = store.jobs.list(states=[JobState.QUEUED], limit=SUBMITS)
    assert len(jobs) == SUBMITS - 2 and all("team admin quota for cpu is 4 devices" in j.queue_reason for j in jobs)
    listed = httpx.get(f"{url}/v1/jobs", params={"state": "QUEUED"}, headers=AUTH).json()["data"]
    assert sorted(j["queue_position"] for j in listed) == list(range(1, SUBMITS - 1))


def test_a_job_no_pool_can_ever_hold_is_refused_naming_the_shortfall(served):
    app, url = served
    wait_until(lambda: app.state.controller.scheduler.snapshot is not None, timeout_s=DEADLINE_S, interval_s=0.02,
               what="the controller's first pass")
    big = {"spec": {**TINY_SPEC, "resources": {"num_workers": 8, "device": "gpu"}}}
    r = httpx.post(f"{url}/v1/jobs", json=big, headers=AUTH)
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "spec", "resources"]
    assert error["msg"] == ("the job can never run on this cluster: pool gpu-a100 can hold at most 4 GPU, "
                                  "16 CPU; the job needs 8 GPU, 9 CPU there (short by 4 GPU)")
    assert app.state.store.jobs.list()[1] == 0  # nothing stored
    fits_later = {"spec": {**TINY_SPEC, "resources": {"num_workers": 4, "device": "gpu"}}}
    r = httpx.post(f"{url}/v1/jobs", json=fits_later, headers=AUTH)
    assert r.status_code == 202
    job_id = r.json()["id"]

    def reason() -> str | None:
        return httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH).json()["queue_reason"]

    wait_until(reason, timeout_s=DEADLINE_S, interval_s=0.02, what="a queue reason")
    assert reason() == "waiting for 1 GPU in pool gpu-a100; 0 jobs ahead"  # an unmanaged Ray job holds one
    c = httpx.get(f"{url}/v1/cluster", headers=AUTH).json()
    gpu = c["pools"]["gpu-a100"]
    assert c["unmanaged_jobs"] == 1 and gpu["capacity"] == {"CPU": 16.0, "GPU": 4.0}
    assert gpu["unmanaged"] == {"GPU": 1.0, "CPU": 1.0} and gpu["free"] == {"CPU": 15.0, "GPU": 3.0}
    assert gpu["queued_demand"] == {"GPU": 4.0, "CPU": 5.0} and gpu["queued_jobs"] == 1
    assert c["pools"]["cpu"]["reserved"] == {} and c["alive_nodes"] == 2
