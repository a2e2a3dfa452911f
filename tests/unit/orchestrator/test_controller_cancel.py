"""The controller cancelling and stopping a job, one reconcile pass at a time: before Ray has it, while
Ray starts it, and while it runs (a checkpoint asked for before the stop)."""

from __future__ import annotations

from jobs.contracts.training import ControlChannel
from orchestrator.states import JobState
from orchestrator.store import submission_id_for
from tests.support.store import running_at_zero, train_job

S = JobState


def test_cancel_while_starting_stops_the_ray_job(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.STARTING
    store.jobs.request_cancel(jid)
    ctl.reconcile_once()
    assert ray.stops == [submission_id_for(jid, 1)]
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.CANCELLED and job.current_attempt.ray_status == "STOPPED"


def test_cancel_before_submission_never_reaches_ray(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    store.jobs.request_cancel(jid)
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.CANCELLED and not ray.submissions


def test_cancel_of_stored_but_unsubmitted_attempt(env):
    store, ray, ctl, settings = env
    jid = train_job(store)
    store.jobs.transition(jid, S.QUEUED, "q")
    store.jobs.transition(jid, S.STARTING, "s", new_attempt=True)
    store.jobs.request_cancel(jid)
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.CANCELLED and not ray.submissions


def test_cancel_of_a_job_ray_never_schedules_ends_after_the_grace(env):
    store, ray, ctl, settings = env
    now = [0.0]
    ctl.clock = lambda: now[0]

    def stop_does_nothing(submission_id):  # Ray queues the stop until the driver is scheduled
        ray.stops.append(submission_id)

    ray.stop = stop_does_nothing
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    store.jobs.request_cancel(jid)
    ctl.reconcile_once()
    assert store.jobs.get(jid).state is S.STARTING
    now[0] = settings.cancel_grace_s + 1
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.CANCELLED and "PENDING" in job.message and len(ray.stops) == 2


def _running_job_cancelled(env):
    store, ray, ctl, settings = env
    jid, sid, now = running_at_zero(env)
    assert store.jobs.get(jid).state is S.RUNNING
    store.jobs.request_cancel(jid)
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
    job = store.jobs.get(jid)
    assert job.state is S.CANCELLED and "checkpoint at step 42 first" in job.message


def test_cancel_of_a_running_job_stops_it_when_no_checkpoint_comes(env):
    store, ray, ctl, settings = env
    jid, sid, now = _running_job_cancelled(env)
    now[0] = settings.stop_checkpoint_timeout_s + 1
    ctl.reconcile_once()
    assert ray.stops == [sid]
    ctl.reconcile_once()
    job = store.jobs.get(jid)
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
