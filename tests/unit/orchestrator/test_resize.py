"""Resize and queued demand, against a fake Ray: the controller one pass at a time (RUNNING ->
RESIZING -> QUEUED with the new demand, no retry used; demand groups published for jobs waiting for
room and withdrawn before their submission), the size bounds, and PATCH /v1/jobs/{id} over HTTP
(422s naming the bounds, 404 for another team, 409 for a job that cannot take a resize)."""

from __future__ import annotations

import shlex

import pytest
from fastapi.testclient import TestClient

from jobs.contracts.elastic import ResizeError, check_size, describe_size, resized, size_bounds
from jobs.contracts.training import ControlChannel
from jobs.kinds import job_kind
from jobs.specs.train import TrainSpec
from orchestrator.api.app import create_app
from orchestrator.controller.demand_groups import DemandGroup, demand_group
from orchestrator.controller.loop import Controller
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store, submission_id_for
from tests.support.control_plane import AUTH, TINY_SPEC, TOKEN
from tests.support.fakes import FakeDemand, FakeRay, progress_line
from workers.waiting import wait_until

S = JobState


@pytest.fixture
def env(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path, max_active_jobs=100, metrics_interval_s=0.001)
    store = Store(settings.database_url)
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 4.0})]  # one default job (3 CPUs) at a time
    demand = FakeDemand(ray)
    yield store, ray, Controller(store, ray, settings, demand=demand), settings, demand
    store.close()


def _job(store, name, workers=2, max_retries=1, team="a", **resources):
    spec = TrainSpec.model_validate({"name": name, "resources": {"num_workers": workers, **resources}})
    job, _ = store.jobs.create(kind="train", name=name, spec=spec.model_dump(mode="json"), max_retries=max_retries,
                               team=team)
    return job.id


def _run(ray, job_id, attempt=1, step=5):
    sid = submission_id_for(job_id, attempt)
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = progress_line(step, 100, 2.5) + "\n"


def _resize_to(store, job_id, workers):
    job = store.jobs.get(job_id)
    raw, _ = resized(job.spec, TrainSpec.model_validate(job.spec), num_workers=workers)
    return store.jobs.request_resize(job_id, TrainSpec.model_validate(raw).model_dump(mode="json"))


def test_a_running_job_is_resized_through_a_checkpoint_and_readmitted_with_its_new_demand(env):
    store, ray, ctl, settings, _ = env
    jid = _job(store, "big", workers=2, max_retries=1)
    for _ in range(2):
        ctl.reconcile_once()
    _run(ray, jid)
    ctl.reconcile_once()
    assert ctl.scheduler.snapshot.decisions.reserved == {"cpu": {"CPU": 3.0}}  # 2 workers + Ray Data's CPU
    assert _resize_to(store, jid, 1).state is S.RUNNING  # stored; the controller moves it
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.RESIZING and job.message == "resizing from 2 workers to 1 worker"
    assert job.spec["resources"]["num_workers"] == 2  # it still holds its old size until it stops
    request = ControlChannel(settings.job_root / jid / "out").pending()
    assert request is not None and request.reason == "resizing from 2 workers to 1 worker"
    ctl.reconcile_once()
    assert ray.stops == []  # no stop before the checkpoint
    ControlChannel(settings.job_root / jid / "out").confirm(request, 7)
    ctl.reconcile_once()
    assert ray.stops == [submission_id_for(jid, 1)]
    ctl.reconcile_once()  # Ray says STOPPED: back in the queue at the new size
    job = store.jobs.get(jid)
    assert job.state is S.QUEUED and job.resizes == 1 and job.resize_spec is None
    assert job.spec["resources"]["num_workers"] == 1
    assert job.message == "resized (checkpoint at step 7 first); waits to restart on 1 worker from its latest checkpoint"
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.STARTING and job.attempts == 2
    assert ctl.scheduler.snapshot.decisions.reserved == {"cpu": {"CPU": 2.0}}  # admitted with its new demand
    first, second = (s for s in ray.submissions if s["metadata"]["orch_job_id"] == jid)
    assert shlex.split(first["entrypoint"]) == shlex.split(second["entrypoint"])  # same --out: resumes
    assert [e.to_state for e in job.events] == [S.PENDING, S.QUEUED, S.STARTING, S.RUNNING, S.RESIZING,
                                                S.QUEUED, S.STARTING]
    assert job.max_retries == 1 and job.retries_left == 1
    _run(ray, jid, attempt=2)
    ctl.reconcile_once()
    ray.restart_cluster()  # the resize did not use up its one retry
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.RETRYING and "retry 1 of 1" in store.jobs.get(jid).message


def test_a_resize_of_a_queued_job_changes_its_demand_at_once(env):
    store, ray, ctl, _, _ = env
    first = _job(store, "first", workers=2)
    second = _job(store, "second", workers=2)
    for _ in range(2):
        ctl.reconcile_once()
    assert store.jobs.get(second).state is S.QUEUED  # 3 of 4 CPUs are taken
    assert _resize_to(store, second, 1).spec["resources"]["num_workers"] == 1
    ctl.reconcile_once()
    assert store.jobs.get(second).state is S.QUEUED and store.jobs.get(first).state is S.STARTING
    assert store.jobs.get(second).queue_reason.startswith("waiting for 1 CPU in pool cpu")  # needs 2, 1 is free


def test_demand_is_published_for_jobs_waiting_for_room_and_withdrawn_before_submission(env):
    store, ray, ctl, _, demand = env
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 6.0})]
    store.teams.put("q", quotas={"cpu": 1.0})
    running = _job(store, "r", workers=2)
    waiting = _job(store, "w", workers=4)
    over_quota = _job(store, "q", workers=1, team="q")  # fits, but not in its team's quota: no node would help
    for _ in range(2):
        ctl.reconcile_once()
    assert "quota" in store.jobs.get(over_quota).queue_reason
    published, _ = demand.published[-1]
    assert list(published) == [waiting]
    assert published[waiting] == DemandGroup.of([({"CPU": 1.0}, {})] * 5)  # 4 workers + Ray Data's CPU
    ray.set(submission_id_for(running, 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()  # the pass that sees it end schedules from what it read first
    submitted_before = len(ray.submissions)
    ctl.reconcile_once()
    assert store.jobs.get(waiting).state is S.STARTING
    published, submissions_then = demand.published[-1]
    assert waiting not in published and submissions_then == submitted_before  # withdrawn, then submitted
    ctl.stop()
    assert demand.closed


def test_demand_groups_have_a_bundle_per_worker_and_select_exact_pools():
    spec = TrainSpec.model_validate({"resources": {"pools": {"gpu-a100": 2, "cpu": 1}, "cpus_per_worker": 2}})
    group = demand_group(job_kind("train").demand(spec), {"head": 0.01})
    bundles = [dict(b) for b in group.bundles]
    selectors = [dict(s) for s in group.selectors]
    assert bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 + [{"CPU": 2.0}, {"CPU": 1.0}, {"head": 0.01}]
    assert selectors == [{"orch.io/pool": "gpu-a100"}] * 2 + [{}] + [{"orch.io/pool": "gpu-a100"}] * 2


def test_size_bounds_of_fixed_and_elastic_sizes_and_multiples_of_expert_parallel():
    fixed = TrainSpec.model_validate({"resources": {"num_workers": 4, "expert_parallel": 2}})
    assert size_bounds(fixed) == (2, 4096) and size_bounds(fixed, ceiling=7) == (2, 6)
    elastic = fixed.model_copy(update={"resources": fixed.resources.model_copy(update={"num_workers": (2, 8)})})
    assert size_bounds(elastic, ceiling=4) == (2, 8)  # a declared pair is the user's own bound
    with pytest.raises(ResizeError, match="not a multiple of resources.expert_parallel"):
        check_size(fixed, 3, (2, 6))
    with pytest.raises(ResizeError, match="out of range: this job runs on 2 to 6 workers"):
        check_size(fixed, 8, (2, 6))
    spanning = TrainSpec.model_validate({"resources": {"pools": {"cpu-a": 2, "cpu-b": 1}}})
    raw, total = resized(spanning.model_dump(mode="json"), spanning, pools={"cpu-a": 1, "cpu-b": 1})
    assert total == 2 and describe_size(raw) == "2 workers (cpu-a: 1, cpu-b: 1)"
    with pytest.raises(ResizeError, match="not pools"):
        resized(raw, spanning, pools={"cpu-a": 1, "cpu-c": 1})
    with pytest.raises(ResizeError, match="give new counts as pools"):
        resized(raw, spanning, num_workers=2)


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.02,
                        metrics_interval_s=0.05, stop_checkpoint_timeout_s=30.0, ray_address=None)
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 4.0})]
    app = create_app(settings, ray=ray)
    with TestClient(app) as client:
        yield client, ray, app, settings
    app.state.store.close()


def _wait_state(client, job_id, state):
    return wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["state"] == state and j,
                      timeout_s=30, interval_s=0.02, what=f"job {job_id} to reach {state}")


def test_patch_resizes_a_running_job_and_refuses_bad_sizes_naming_the_bounds(served):
    client, ray, app, settings = served
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC, "max_retries": 1}, headers=AUTH).json()["id"]
    _wait_state(client, job_id, "STARTING")
    ray.set(submission_id_for(job_id, 1), "RUNNING")
    _wait_state(client, job_id, "RUNNING")
    # 4 CPUs: at most 3 workers beside Ray Data's CPU.
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 4}, headers=AUTH)
    assert r.status_code == 422 and "out of range: this job runs on 1 to 3 workers" in r.text
    assert r.json()["detail"][0]["loc"] == ["body", "num_workers"]
    for body in ({"num_workers": 0}, {}, {"num_workers": 1, "pools": {"cpu": 1}}):
        assert client.patch(f"/v1/jobs/{job_id}", json=body, headers=AUTH).status_code == 422, body
    r = client.patch(f"/v1/jobs/{job_id}", json={"pools": {"cpu": 1}}, headers=AUTH)
    assert r.status_code == 422 and "this job runs on one pool (cpu): give num_workers" in r.text
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 1}, headers=AUTH)
    assert r.status_code == 202, r.text
    _wait_state(client, job_id, "RESIZING")
    channel = ControlChannel(settings.job_root / job_id / "out")
    channel.confirm(wait_until(channel.pending, timeout_s=30, interval_s=0.02, what="the checkpoint request"), 3)
    job = _wait_state(client, job_id, "STARTING")
    assert job["spec"]["resources"]["num_workers"] == 1 and job["resizes"] == 1 and job["attempts"] == 2
    assert job["max_retries"] == 1
    resizing = next(h for h in job["history"] if h["to_state"] == "RESIZING")
    assert resizing["reason"] == "resizing from 2 workers to 1 worker"
    assert any(h["to_state"] == "QUEUED" and "checkpoint at step 3 first" in h["reason"] for h in job["history"])
    [entry] = [a for a in app.state.store.audit.list()[0] if a.action == "resize"]
    assert (entry.actor, entry.target, entry.detail) == ("admin", job_id, "to 1 worker in state RUNNING")
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 2}, headers=AUTH)
    assert r.status_code == 409 and "STARTING" in r.json()["detail"]


def test_patch_refuses_sizes_that_are_not_a_multiple_of_expert_parallel_and_other_teams_jobs(served):
    client, _, _, _ = served
    spec = TINY_SPEC | {"resources": {"num_workers": 2, "expert_parallel": 2}}
    job_id = client.post("/v1/jobs", json={"spec": spec}, headers=AUTH).json()["id"]
    _wait_state(client, job_id, "STARTING")
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 3}, headers=AUTH)
    assert r.status_code == 422 and "3 workers is not a multiple of resources.expert_parallel (2)" in r.text
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 4}, headers=AUTH)
    assert r.status_code == 422 and "out of range: this job runs on 2 to 2 workers" in r.text  # 3 CPUs for workers
    r = client.post("/v1/tokens", json={"user": "carol", "team": "cv"}, headers=AUTH)
    carol = {"Authorization": f"Bearer {r.json()['token']}"}
    r = client.patch(f"/v1/jobs/{job_id}", json={"num_workers": 2}, headers=carol)
    assert r.status_code == 404 and r.json()["detail"] == f"no job {job_id}"


def test_orch_scale_resizes_over_the_api_and_names_the_bounds(tmp_path, monkeypatch, capsys):
    from orchestrator import cli
    from tests.support.servers import BackgroundServer

    ray = FakeRay()
    ray.reachable = False  # jobs are never admitted: a resize just rewrites their size
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path, ray_address=None), ray=ray)
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        spec = TINY_SPEC | {"resources": {"num_workers": 4, "expert_parallel": 2}}
        job_id = app.state.store.jobs.create(kind="train", name="tiny", spec=TrainSpec.model_validate(spec).model_dump(
            mode="json"), max_retries=0)[0].id
        assert cli.main(["scale", job_id, "2"]) == 0
        assert f"resize requested for {job_id} (now " in capsys.readouterr().out
        assert app.state.store.jobs.get(job_id).spec["resources"]["num_workers"] == 2
        assert cli.main(["scale", job_id, "3"]) == 2
        assert "not a multiple of resources.expert_parallel (2)" in capsys.readouterr().err
        assert cli.main(["scale", job_id]) == 2 and cli.main(["scale", job_id, "--pool", "cpu"]) == 2
    app.state.store.close()
