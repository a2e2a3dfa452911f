"""The controller marking a running job that reports no new step as stalled, and clearing the mark."""

from __future__ import annotations

from orchestrator.api.schemas.jobs import JobPublic
from orchestrator.cli import render
from orchestrator.settings import Settings
from orchestrator.states import JobState
from tests.support.control_plane import TOKEN
from tests.support.fakes import progress_line
from tests.support.store import running_at_zero

S = JobState


def _stall_gauges(ctl):
    sample = ctl.telemetry.registry.get_sample_value
    return sample("orch_jobs_stalled"), sample("orch_job_stalls_total")


def test_a_running_job_without_new_steps_is_marked_stalled_until_a_step_comes(env):
    store, ray, ctl, settings = env
    jid, sid, now = running_at_zero(env, progress_line(2, 4, 3.5) + "\n")
    now[0] = settings.stall_after_s - 1
    ctl.reconcile_once()
    assert "stalled" not in store.jobs.get(jid).metrics and _stall_gauges(ctl) == (0, 0)
    now[0] = settings.stall_after_s + 5
    ctl.reconcile_once()
    m = store.jobs.get(jid).metrics
    assert m["stalled"].startswith(f"no progress for {settings.stall_after_s + 5:.0f} s since step 2")
    assert m["stalled_for_s"] == int(settings.stall_after_s + 5) and m["step"] == 2
    assert _stall_gauges(ctl) == (1, 1)
    now[0] += 30
    ctl.reconcile_once()
    assert store.jobs.get(jid).metrics["stalled_for_s"] == int(settings.stall_after_s + 35)
    assert _stall_gauges(ctl) == (1, 1)  # still the same stall
    ray.job_logs[sid] += progress_line(3, 4, 3.0) + "\n"
    now[0] += 1
    ctl.reconcile_once()
    m = store.jobs.get(jid).metrics
    assert m["step"] == 3 and not set(m) & {"stalled", "stalled_for_s"}
    assert _stall_gauges(ctl) == (0, 1)
    now[0] += settings.stall_after_s
    ctl.reconcile_once()
    assert "since step 3" in store.jobs.get(jid).metrics["stalled"] and _stall_gauges(ctl) == (1, 2)
    ray.set(sid, "SUCCEEDED", exit_code=0)  # the final read leaves no stall mark on a finished job
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.SUCCEEDED and job.metrics["step"] == 3 and "stalled" not in job.metrics
    ctl.reconcile_once()
    assert _stall_gauges(ctl) == (0, 2)


def test_a_job_stalled_before_its_first_step_is_cleared_when_its_attempt_is_lost(env, capsys):
    """The shape of a job whose workers or Ray Data never get CPUs: RUNNING, no progress line at all."""
    store, ray, ctl, settings = env
    jid, sid, now = running_at_zero(env)
    now[0] = settings.stall_after_s
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert "no step reported yet" in job.metrics["stalled"] and _stall_gauges(ctl) == (1, 1)
    render.emit(*render.job_detail(JobPublic.of(job).model_dump(mode="json")))  # what `orch status` prints
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("stalled ")]
    assert "no step reported yet" in line
    ray.restart_cluster()
    ctl.reconcile_once()
    job = store.jobs.get(jid)
    assert job.state is S.RETRYING and not set(job.metrics or {}) & {"stalled", "stalled_for_s"}
    ctl.reconcile_once()
    assert _stall_gauges(ctl) == (0, 1)


def test_the_stall_time_is_read_from_orch_stall_after_s(monkeypatch):
    monkeypatch.setenv("ORCH_STALL_AFTER_S", "42")
    assert Settings(api_token=TOKEN).stall_after_s == 42.0
