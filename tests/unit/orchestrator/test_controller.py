"""The controller, one reconcile pass at a time, against a scripted fake Ray: a job's way through
its states, retries, failures and the bound on active jobs."""

from __future__ import annotations

import json
import shlex

import pytest

from orchestrator.controller.loop import Controller
from orchestrator.controller.observe import latest_progress
from orchestrator.states import JobState
from orchestrator.store import submission_id_for
from tests.support.fakes import progress_line, summary_json
from tests.support.store import train_job

S = JobState


def _states(store, job_id):
    return [e.to_state for e in store.jobs.get(job_id).events]


def test_happy_path_moves_one_step_per_pass(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.QUEUED
    ctl.reconcile_once()
    job = store.jobs.get(jid)
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
    assert store.jobs.get(jid).state is S.STARTING  # Ray still PENDING
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = f"noise\n{progress_line(2, 4, 3.5)}\nmore noise\n"
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.RUNNING and job.metrics["step"] == 2 and job.metrics["loss"] == 3.5
    ray.job_logs[sid] += progress_line(4, 4, 2.0) + "\n"
    (settings.job_root / jid / "out" / "summary.json").write_text(summary_json(final_loss=1.9, samples=["x"]))
    ray.set(sid, "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.SUCCEEDED
    assert job.metrics["step"] == 4 and job.metrics["final_loss"] == 1.9 and "samples" not in job.metrics
    assert _states(store, jid) == [S.PENDING, S.QUEUED, S.STARTING, S.RUNNING, S.SUCCEEDED]
    assert len(ray.submissions) == 1


def test_crash_between_storing_and_submitting_submits_once(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    store.jobs.transition(jid, S.QUEUED, "q")
    store.jobs.transition(jid, S.STARTING, "stored, then the process died", new_attempt=True)
    assert not ray.submissions
    ctl.reconcile_once()  # the restarted controller
    ctl.reconcile_once()
    assert [s["submission_id"] for s in ray.submissions] == [submission_id_for(jid, 1)]


def test_fault_hook_runs_before_submit_with_the_attempt_stored_and_ray_not_called(env):
    """The point test_ray_jobs kills the service at: what the hook sees is what a crash leaves."""
    store, ray, _, settings = env
    seen = []

    def hook(point):
        job = store.jobs.get(jid)
        seen.append((point, job.state, job.current_attempt.submitted_at, len(ray.submissions)))

    ctl = Controller(store, ray, settings, fault_hook=hook)
    jid = train_job(store)
    ctl.reconcile_once()  # accepted: no attempt yet, no hook
    assert seen == []
    ctl.reconcile_once()
    assert seen == [("before_submit", S.STARTING, None, 0)]
    assert [s["submission_id"] for s in ray.submissions] == [submission_id_for(jid, 1)]


def test_crash_after_submitting_before_recording_does_not_submit_again(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    store.jobs.transition(jid, S.QUEUED, "q")
    store.jobs.transition(jid, S.STARTING, "s", new_attempt=True)
    sid = submission_id_for(jid, 1)
    ray.set(sid, "RUNNING")  # it reached Ray; submitted_at was never stored
    ctl.reconcile_once()
    assert ray.submissions == [] and store.jobs.get(jid).current_attempt.submitted_at is not None
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.RUNNING


def test_lost_driver_is_retried_with_same_output_then_fails_when_retries_run_out(env):
    store, ray, ctl, settings = env
    jid = train_job(store, max_retries=1)
    for _ in range(2):
        ctl.reconcile_once()
    ray.set(submission_id_for(jid, 1), "RUNNING")
    ctl.reconcile_once()
    ray.restart_cluster()
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.RETRYING and "lost" in job.message and "retry 1 of 1" in job.message
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.STARTING and job.attempts == 2
    first, second = ray.submissions
    assert second["submission_id"] == submission_id_for(jid, 2)
    assert shlex.split(first["entrypoint"]) == shlex.split(second["entrypoint"])  # same --spec and --out
    ray.set(submission_id_for(jid, 2), "FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED")
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.FAILED and "no retries left" in job.message


@pytest.mark.parametrize(("exit_code", "final"), [(1, S.FAILED), (2, S.FAILED), (-9, S.RETRYING)])
def test_exit_codes(env, exit_code, final):
    store, ray, ctl, settings = env
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    ray.set(submission_id_for(jid, 1), "FAILED", exit_code=exit_code, error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
            message="driver failed")
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is final and job.current_attempt.exit_code == exit_code


def test_active_jobs_are_bounded_and_the_rest_wait_queued(env):
    store, ray, ctl, settings = env
    ids = [train_job(store, name=f"j{i}") for i in range(3)]
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert [store.jobs.get(i).state for i in ids] == [S.STARTING, S.STARTING, S.QUEUED]
    ray.set(submission_id_for(ids[0], 1), "SUCCEEDED", exit_code=0)
    ctl.reconcile_once()
    ctl.reconcile_once()
    assert [store.jobs.get(i).state for i in ids] == [S.SUCCEEDED, S.STARTING, S.STARTING]


def test_unreachable_ray_changes_nothing(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    ray.reachable = False
    for _ in range(3):
        ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.STARTING and ctl.ray_reachable is False
    ray.reachable = True
    ctl.reconcile_once()
    assert ctl.ray_reachable is True and store.jobs.get(jid).state is S.STARTING


def test_refused_submission_fails_the_job(env):
    store, ray, ctl, settings = env
    ray.refuse = "bad runtime_env"
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.FAILED and "bad runtime_env" in job.message


def test_stored_spec_that_no_longer_validates_fails_before_ray(env):
    store, ray, ctl, settings = env
    job, _ = store.jobs.create(kind="train", name="x", spec={"train": {"steps": -1}}, max_retries=0)
    ctl.reconcile_once()
    job = store.jobs.get(job.id)
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


def test_one_broken_job_does_not_stall_the_others(env, monkeypatch):
    store, ray, ctl, settings = env
    bad, good = train_job(store, name="bad"), train_job(store, name="good")
    ctl.reconcile_once()
    real_write = __import__("orchestrator.controller.entrypoints", fromlist=["JobPaths"]).JobPaths.write_spec

    def write_spec(self, spec):
        if bad in str(self.root):
            raise OSError("No space left on device")
        real_write(self, spec)

    monkeypatch.setattr("orchestrator.controller.entrypoints.JobPaths.write_spec", write_spec)
    ctl.reconcile_once()
    assert store.jobs.get(bad).state is S.QUEUED and store.jobs.get(good).state is S.STARTING
