"""The controller, one reconcile pass at a time, against a scripted fake Ray."""

from __future__ import annotations

import json
import shlex

import pytest

from jobs.contracts import ControlChannel
from orchestrator.api.schemas.jobs import JobPublic
from orchestrator.cli import render
from orchestrator.controller.loop import Controller
from orchestrator.controller.observe import latest_progress
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import JobStore, submission_id_for
from tests.support.fakes import FakeRay, progress_line, summary_json

S = JobState
TOKEN = "t" * 32


@pytest.fixture
def env(tmp_path):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path, max_active_jobs=2, metrics_interval_s=0.001)
    store = JobStore(settings.database_url)
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 16.0})]  # room for 5 default jobs
    yield store, ray, Controller(store, ray, settings), settings
    store.close()


def _job(store, max_retries=1, name="demo"):
    job, _ = store.create(kind="train", name=name, spec={"name": name, "train": {"steps": 4}},
                          max_retries=max_retries)
    return job.id


def _states(store, job_id):
    return [e.to_state for e in store.get(job_id).events]


def test_happy_path_moves_one_step_per_pass(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    ctl.reconcile_once()
    assert store.get(jid).state is S.QUEUED
    ctl.reconcile_once()
    job = store.get(jid)
    sid = submission_id_for(jid, 1)
    assert job.state is S.STARTING and job.current_attempt.submission_id == sid
    assert job.current_attempt.submitted_at is not None
    [sub] = ray.submissions
    assert sub["submission_id"] == sid and sub["metadata"]["orch_job_id"] == jid
    argv = shlex.split(sub["entrypoint"])
    spec_path = settings.job_root / jid / "spec.json"
    assert argv == ["python", "-m", "jobs.train", "--spec", str(spec_path), "--out", str(settings.job_root / jid / "out")]
    assert json.loads(spec_path.read_text()) == job.spec
    ctl.reconcile_once()
    assert store.get(jid).state is S.STARTING  # Ray still PENDING
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = f"noise\n{progress_line(2, 4, 3.5)}\nmore noise\n"
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.RUNNING and job.metrics["step"] == 2 and job.metrics["loss"] == 3.5
    ray.job_logs[sid] += progress_line(4, 4, 2.0) + "\n"
    (settings.job_root / jid / "out" / "summary.json").write_text(summary_json(final_loss=1.9, samples=["x"]))
    ray.set(sid, "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.SUCCEEDED
    assert job.metrics["step"] == 4 and job.metrics["final_loss"] == 1.9 and "samples" not in job.metrics
    assert _states(store, jid) == [S.PENDING, S.QUEUED, S.STARTING, S.RUNNING, S.SUCCEEDED]
    assert len(ray.submissions) == 1


def test_crash_between_storing_and_submitting_submits_once(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    store.transition(jid, S.QUEUED, "q")
    store.transition(jid, S.STARTING, "stored, then the process died", new_attempt=True)
    assert not ray.submissions
    ctl.reconcile_once()  # the restarted controller
    ctl.reconcile_once()
    assert [s["submission_id"] for s in ray.submissions] == [submission_id_for(jid, 1)]


def test_fault_hook_runs_before_submit_with_the_attempt_stored_and_ray_not_called(env):
    """The point test_ray_jobs kills the service at: what the hook sees is what a crash leaves."""
    store, ray, _, settings = env
    seen = []

    def hook(point):
        job = store.get(jid)
        seen.append((point, job.state, job.current_attempt.submitted_at, len(ray.submissions)))

    ctl = Controller(store, ray, settings, fault_hook=hook)
    jid = _job(store)
    ctl.reconcile_once()  # accepted: no attempt yet, no hook
    assert seen == []
    ctl.reconcile_once()
    assert seen == [("before_submit", S.STARTING, None, 0)]
    assert [s["submission_id"] for s in ray.submissions] == [submission_id_for(jid, 1)]


def test_crash_after_submitting_before_recording_does_not_submit_again(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    store.transition(jid, S.QUEUED, "q")
    store.transition(jid, S.STARTING, "s", new_attempt=True)
    sid = submission_id_for(jid, 1)
    ray.set(sid, "RUNNING")  # it reached Ray; submitted_at was never stored
    ctl.reconcile_once()
    assert ray.submissions == [] and store.get(jid).current_attempt.submitted_at is not None
    ctl.reconcile_once()
    assert store.get(jid).state is S.RUNNING


def test_lost_driver_is_retried_with_same_output_then_fails_when_retries_run_out(env):
    store, ray, ctl, settings = env
    jid = _job(store, max_retries=1)
    for _ in range(2):
        ctl.reconcile_once()
    ray.set(submission_id_for(jid, 1), "RUNNING")
    ctl.reconcile_once()
    ray.restart_cluster()
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.RETRYING and "lost" in job.message and "retry 1 of 1" in job.message
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.STARTING and job.attempts == 2
    first, second = ray.submissions
    assert second["submission_id"] == submission_id_for(jid, 2)
    assert shlex.split(first["entrypoint"]) == shlex.split(second["entrypoint"])  # same --spec and --out
    ray.set(submission_id_for(jid, 2), "FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED")
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.FAILED and "no retries left" in job.message


@pytest.mark.parametrize(("exit_code", "final"), [(1, S.FAILED), (2, S.FAILED), (-9, S.RETRYING)])
def test_exit_codes(env, exit_code, final):
    store, ray, ctl, settings = env
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    ray.set(submission_id_for(jid, 1), "FAILED", exit_code=exit_code, error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
            message="driver failed")
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is final and job.current_attempt.exit_code == exit_code


def test_cancel_while_starting_stops_the_ray_job(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    assert store.get(jid).state is S.STARTING
    store.request_cancel(jid)
    ctl.reconcile_once()
    assert ray.stops == [submission_id_for(jid, 1)]
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.CANCELLED and job.current_attempt.ray_status == "STOPPED"


def test_cancel_before_submission_never_reaches_ray(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    store.request_cancel(jid)
    ctl.reconcile_once()
    assert store.get(jid).state is S.CANCELLED and not ray.submissions


def test_cancel_of_stored_but_unsubmitted_attempt(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    store.transition(jid, S.QUEUED, "q")
    store.transition(jid, S.STARTING, "s", new_attempt=True)
    store.request_cancel(jid)
    ctl.reconcile_once()
    assert store.get(jid).state is S.CANCELLED and not ray.submissions


def test_active_jobs_are_bounded_and_the_rest_wait_queued(env):
    store, ray, ctl, settings = env
    ids = [_job(store, name=f"j{i}") for i in range(3)]
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert [store.get(i).state for i in ids] == [S.STARTING, S.STARTING, S.QUEUED]
    ray.set(submission_id_for(ids[0], 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert [store.get(i).state for i in ids] == [S.SUCCEEDED, S.STARTING, S.STARTING]


def test_unreachable_ray_changes_nothing(env):
    store, ray, ctl, settings = env
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    ray.reachable = False
    for _ in range(3):
        ctl.reconcile_once()
    assert store.get(jid).state is S.STARTING and ctl.ray_reachable is False
    ray.reachable = True
    ctl.reconcile_once()
    assert ctl.ray_reachable is True and store.get(jid).state is S.STARTING


def test_refused_submission_fails_the_job(env):
    store, ray, ctl, settings = env
    ray.refuse = "bad runtime_env"
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.FAILED and "bad runtime_env" in job.message


def test_stored_spec_that_no_longer_validates_fails_before_ray(env):
    store, ray, ctl, settings = env
    job, _ = store.create(kind="train", name="x", spec={"train": {"steps": -1}}, max_retries=0)
    ctl.reconcile_once()
    job = store.get(job.id)
    assert job.state is S.FAILED and not ray.submissions


def test_only_one_controller_per_state_dir(env):
    store, ray, ctl, settings = env
    from orchestrator.controller.loop import ControllerBusy

    ctl.start()
    try:
        with pytest.raises(ControllerBusy):
            Controller(store, ray, settings).start()
    finally:
        ctl.stop()


def test_latest_progress_takes_the_last_line():
    latest = latest_progress(f"a\n{progress_line(1, 5, 2.0)}\n{progress_line(2, 5, 1.5)}\nb")
    assert (latest["step"], latest["total_steps"], latest["loss"]) == (2, 5, 1.5)
    assert latest_progress("nothing here") is None
    assert latest_progress("[progress] step=2/5") is None  # not a whole record


def test_cancel_of_a_job_ray_never_schedules_ends_after_the_grace(env):
    store, ray, ctl, settings = env
    now = [0.0]
    ctl.clock = lambda: now[0]

    def stop_does_nothing(submission_id):  # Ray queues the stop until the driver is scheduled
        ray.stops.append(submission_id)

    ray.stop = stop_does_nothing
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    store.request_cancel(jid)
    ctl.reconcile_once()
    assert store.get(jid).state is S.STARTING
    now[0] = settings.cancel_grace_s + 1
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.CANCELLED and "PENDING" in job.message and len(ray.stops) == 2


def test_one_broken_job_does_not_stall_the_others(env, monkeypatch):
    store, ray, ctl, settings = env
    bad, good = _job(store, name="bad"), _job(store, name="good")
    ctl.reconcile_once()
    real_write = __import__("orchestrator.controller.entrypoints", fromlist=["JobPaths"]).JobPaths.write_spec

    def write_spec(self, spec):
        if bad in str(self.root):
            raise OSError("No space left on device")
        real_write(self, spec)

    monkeypatch.setattr("orchestrator.controller.entrypoints.JobPaths.write_spec", write_spec)
    ctl.reconcile_once()
    assert store.get(bad).state is S.QUEUED and store.get(good).state is S.STARTING


def _running_at_zero(env, logs=""):
    """A job its controller first sees RUNNING at t=0 of a fake clock; (job id, submission id, clock)."""
    store, ray, ctl, settings = env
    now = [0.0]
    ctl.clock = lambda: now[0]
    jid = _job(store)
    for _ in range(2):
        ctl.reconcile_once()
    sid = submission_id_for(jid, 1)
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = logs
    ctl.reconcile_once()
    return jid, sid, now


def _running_job_cancelled(env):
    store, ray, ctl, settings = env
    jid, sid, now = _running_at_zero(env)
    assert store.get(jid).state is S.RUNNING
    store.request_cancel(jid)
    ctl.reconcile_once()
    assert ray.stops == []  # asked the loop for a checkpoint; not stopped yet
    return jid, sid, now


def test_cancel_of_a_running_job_checkpoints_before_the_stop(env):
    store, ray, ctl, settings = env
    jid, sid, _ = _running_job_cancelled(env)
    channel = ControlChannel(settings.job_root / jid / "out")
    request = channel.pending()
    assert request is not None and request.reason == "cancelled by user"
    ctl.reconcile_once()
    assert ray.stops == []  # still waiting for the loop
    channel.confirm(request, 42)  # what rank 0 does once the checkpoint is reported
    ctl.reconcile_once()
    assert ray.stops == [sid]
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.CANCELLED and "checkpoint at step 42 first" in job.message


def test_cancel_of_a_running_job_stops_it_when_no_checkpoint_comes(env):
    store, ray, ctl, settings = env
    jid, sid, now = _running_job_cancelled(env)
    now[0] = settings.stop_checkpoint_timeout_s + 1
    ctl.reconcile_once()
    assert ray.stops == [sid]
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.CANCELLED and "no checkpoint confirmed" in job.message


def test_a_stop_that_ray_carries_out_slowly_asks_for_one_checkpoint_only(env, monkeypatch):
    store, ray, ctl, settings = env
    jid, sid, now = _running_job_cancelled(env)
    channel = ControlChannel(settings.job_root / jid / "out")
    request = channel.pending()
    assert request.hold_s > 0  # the loop holds at its checkpoint until the stop lands
    channel.confirm(request, 42)
    monkeypatch.setattr(ray, "stop", lambda submission_id: ray.stops.append(submission_id))  # Ray still RUNNING
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert ray.stops == [sid, sid] and channel.pending() is None  # stopped again, never asked again
    assert ControlChannel(settings.job_root / jid / "out").confirmation(request).step == 42


def test_an_unanswered_request_is_withdrawn_before_the_stop(env):
    store, ray, ctl, settings = env
    jid, sid, now = _running_job_cancelled(env)
    channel = ControlChannel(settings.job_root / jid / "out")
    assert channel.pending() is not None
    now[0] = settings.stop_checkpoint_timeout_s + 1
    ctl.reconcile_once()
    assert ray.stops == [sid] and channel.pending() is None  # a later attempt will not hold for it


def _stall_gauges(ctl):
    sample = ctl.telemetry.registry.get_sample_value
    return sample("orch_jobs_stalled"), sample("orch_job_stalls_total")


def test_a_running_job_without_new_steps_is_marked_stalled_until_a_step_comes(env):
    store, ray, ctl, settings = env
    jid, sid, now = _running_at_zero(env, progress_line(2, 4, 3.5) + "\n")
    now[0] = settings.stall_after_s - 1
    ctl.reconcile_once()
    assert "stalled" not in store.get(jid).metrics and _stall_gauges(ctl) == (0, 0)
    now[0] = settings.stall_after_s + 5
    ctl.reconcile_once()
    m = store.get(jid).metrics
    assert m["stalled"].startswith(f"no progress for {settings.stall_after_s + 5:.0f} s since step 2")
    assert m["stalled_for_s"] == int(settings.stall_after_s + 5) and m["step"] == 2
    assert _stall_gauges(ctl) == (1, 1)
    now[0] += 30
    ctl.reconcile_once()
    assert store.get(jid).metrics["stalled_for_s"] == int(settings.stall_after_s + 35)
    assert _stall_gauges(ctl) == (1, 1)  # still the same stall
    ray.job_logs[sid] += progress_line(3, 4, 3.0) + "\n"
    now[0] += 1
    ctl.reconcile_once()
    m = store.get(jid).metrics
    assert m["step"] == 3 and not set(m) & {"stalled", "stalled_for_s"}
    assert _stall_gauges(ctl) == (0, 1)
    now[0] += settings.stall_after_s
    ctl.reconcile_once()
    assert "since step 3" in store.get(jid).metrics["stalled"] and _stall_gauges(ctl) == (1, 2)
    ray.set(sid, "SUCCEEDED", exit_code=0)  # the final read leaves no stall mark on a finished job
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.SUCCEEDED and job.metrics["step"] == 3 and "stalled" not in job.metrics
    ctl.reconcile_once()
    assert _stall_gauges(ctl) == (0, 2)


def test_a_job_stalled_before_its_first_step_is_cleared_when_its_attempt_is_lost(env, capsys):
    """The shape of a job whose workers or Ray Data never get CPUs: RUNNING, no progress line at all."""
    store, ray, ctl, settings = env
    jid, sid, now = _running_at_zero(env)
    now[0] = settings.stall_after_s
    ctl.reconcile_once()
    job = store.get(jid)
    assert "no step reported yet" in job.metrics["stalled"] and _stall_gauges(ctl) == (1, 1)
    render.emit(*render.job_detail(JobPublic.of(job).model_dump(mode="json")))  # what `orch status` prints
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("stalled ")]
    assert "no step reported yet" in line
    ray.restart_cluster()
    ctl.reconcile_once()
    job = store.get(jid)
    assert job.state is S.RETRYING and not set(job.metrics or {}) & {"stalled", "stalled_for_s"}
    ctl.reconcile_once()
    assert _stall_gauges(ctl) == (0, 1)


def test_the_stall_time_is_read_from_orch_stall_after_s(monkeypatch):
    monkeypatch.setenv("ORCH_STALL_AFTER_S", "42")
    assert Settings(api_token=TOKEN).stall_after_s == 42.0
