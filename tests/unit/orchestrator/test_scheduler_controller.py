"""The controller's scheduling step, one pass at a time, against a fake Ray: queue positions and
reasons, quotas, preemption with checkpoint and resume, and the metrics."""

from __future__ import annotations

import shlex

import pytest

from jobs.contracts.training import ControlChannel
from orchestrator.controller.loop import Controller
from orchestrator.ray_client import NodeView, UnmanagedJob
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store, submission_id_for
from tests.support.fakes import FakeRay, progress_line

S = JobState
TOKEN = "t" * 32


@pytest.fixture
def env(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path, max_active_jobs=100, metrics_interval_s=0.001)
    store = Store(settings.database_url)
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 4.0})]  # one default job (3 CPUs) at a time
    yield store, ray, Controller(store, ray, settings), settings
    store.close()


def _job(store, name, team="a", priority="normal", workers=2, max_retries=1):
    job, _ = store.jobs.create(kind="train", name=name, spec={"name": name, "resources": {"num_workers": workers}},
                               max_retries=max_retries, team=team, priority=priority)
    return job.id


def _run(ray, job_id, attempt=1, step=5):
    sid = submission_id_for(job_id, attempt)
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = progress_line(step, 100, 2.5, tokens_per_s=1234.0) + "\n"


def test_queued_jobs_carry_their_position_and_reason(env):
    store, ray, ctl, _ = env
    ids = [_job(store, f"j{i}") for i in range(3)]
    ctl.reconcile_once()
    ctl.reconcile_once()
    first, second, third = (store.jobs.get(i) for i in ids)
    assert first.state is S.STARTING and (first.queue_position, first.queue_reason) == (None, None)
    assert (second.queue_position, second.queue_reason) == (1, "waiting for 2 CPU in pool cpu; 0 jobs ahead")
    assert third.queue_position == 2 and third.queue_reason.endswith("; 1 job ahead")
    ray.set(submission_id_for(ids[0], 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert store.jobs.get(ids[1]).state is S.STARTING and store.jobs.get(ids[2]).queue_position == 1


def test_unmanaged_ray_jobs_hold_back_admission(env):
    store, ray, ctl, _ = env
    ray.unmanaged = [UnmanagedJob("raysubmit_x", "05000000", "RUNNING", {"n1": {"CPU": 2.0}})]
    jid = _job(store, "j")
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert store.jobs.get(jid).queue_reason.startswith("waiting for 1 CPU in pool cpu")
    ray.unmanaged = []
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.STARTING


def test_team_quota_holds_across_passes(env):
    store, ray, ctl, _ = env
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 64.0})]
    store.teams.put("a", quotas={"cpu": 7.0})
    ids = [_job(store, f"j{i}", workers=1) for i in range(5)]  # 1 worker CPU + 1 Ray Data CPU each
    for _ in range(4):
        ctl.reconcile_once()
    states = [store.jobs.get(i).state for i in ids]
    assert states.count(S.STARTING) == 3 and "team a quota for cpu is 7 devices" in store.jobs.get(ids[3]).queue_reason


def test_a_high_priority_job_preempts_a_low_one_which_resumes_from_its_checkpoint(env):
    store, ray, ctl, settings = env
    low = _job(store, "low", team="b", priority="low", max_retries=1)
    for _ in range(2):
        ctl.reconcile_once()
    _run(ray, low)
    ctl.reconcile_once()
    assert store.jobs.get(low).state is S.RUNNING
    high = _job(store, "high", priority="high")
    ctl.reconcile_once()  # accepted
    ctl.reconcile_once()  # no room: the low job is asked to checkpoint
    victim = store.jobs.get(low)
    assert victim.state is S.PREEMPTING and victim.preemptions == 1 and "preempted by job " + high in victim.message
    assert "preempting 1 lower-priority job" in store.jobs.get(high).queue_reason
    channel = ControlChannel(settings.job_root / low / "out")
    request = channel.pending()
    assert request is not None and request.reason.startswith("preempted")
    ctl.reconcile_once()
    assert ray.stops == [] and "making room" in store.jobs.get(high).queue_reason  # no second victim meanwhile
    channel.confirm(request, 7)
    ctl.reconcile_once()  # checkpointed: stopped
    assert ray.stops == [submission_id_for(low, 1)]
    ctl.reconcile_once()  # Ray says STOPPED: back in the queue
    victim = store.jobs.get(low)
    assert victim.state is S.QUEUED and "checkpoint at step 7 first" in victim.message
    ctl.reconcile_once()
    assert store.jobs.get(high).state is S.STARTING and store.jobs.get(low).queue_reason.startswith("waiting for")
    ray.set(submission_id_for(high, 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    ctl.reconcile_once()
    resumed = store.jobs.get(low)
    assert resumed.state is S.STARTING and resumed.attempts == 2
    first, second = (s for s in ray.submissions if s["metadata"]["orch_job_id"] == low)
    assert shlex.split(first["entrypoint"]) == shlex.split(second["entrypoint"])  # same --out: resumes
    assert [e.to_state for e in resumed.events] == [S.PENDING, S.QUEUED, S.STARTING, S.RUNNING, S.PREEMPTING,
                                                     S.QUEUED, S.STARTING]
    [entry] = [a for a in store.audit.list()[0] if a.action == "preempt"]
    assert (entry.actor, entry.target, entry.team) == ("scheduler", low, "b") and high in entry.detail
    _run(ray, low, attempt=2)
    ctl.reconcile_once()
    ray.restart_cluster()  # the preemption did not use up its one retry
    ctl.reconcile_once()
    assert store.jobs.get(low).state is S.RETRYING and "retry 1 of 1" in store.jobs.get(low).message


def test_metrics_show_running_jobs_figures_and_the_queue(env):
    store, ray, ctl, _ = env
    running = _job(store, "r")
    _job(store, "w", priority="low")
    for _ in range(2):
        ctl.reconcile_once()
    _run(ray, running)
    ctl.reconcile_once()
    ctl.reconcile_once()  # the registry reads what the last pass left
    sample = ctl.telemetry.registry.get_sample_value
    assert sample("orch_job_loss", {"job_id": running}) == 2.5
    assert sample("orch_job_tokens_per_second", {"job_id": running}) == 1234.0
    assert sample("orch_queued_jobs", {"pool": "cpu", "priority": "low"}) == 1
    assert sample("orch_queued_demand", {"pool": "cpu", "resource": "CPU"}) == 3.0
    assert sample("orch_pool_reserved", {"pool": "cpu", "resource": "CPU"}) == 3.0
    ray.set(submission_id_for(running, 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert sample("orch_job_loss", {"job_id": running}) is None  # gone once it ended
