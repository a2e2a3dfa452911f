"""One small real sweep, run once per test session and shared: by the sweep tests (events, summary,
stop, resume, API, CLI) and by the dashboard's browser tests (its sweeps page reads the same API).

``python -m jobs.sweep`` as a user runs it: 3 trials of the demo sweep's tiny model (300 steps, a
report every 50, 1 worker each, 2 at once, FIFO). While it runs, the first trial to start is asked to
stop (the file the API's stop route writes: the trial's loop checkpoints at the end of its current
step and ends, usually at step 1); once that trial has stopped and another has a checkpoint, the
driver is killed (SIGKILL to its process group, the embedded cluster included) and the same command
is run again, which resumes the experiment. About a minute on 2 busy cores.

Use: ``pytest_plugins = ["tests.support.sweeps"]`` in a test module registers the fixture ``real_sweep`` once for
the whole session (importing the fixture function into each module would make one fixture, and one
run, per module); ``attach(run, job_out)`` puts the run's files where the service looks for a sweep
job's output. PYTEST_DONT_REWRITE: those modules import this one before pytest registers it, too late
for assertion rewriting (its one assert carries its own message).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jobs.contracts.sweep_events import EVENTS_FILE, STOP_DIR, SUMMARY_FILE, read_events, request_stop
from workers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "jobs" / "examples" / "sweep-demo.yaml"
# Trials long enough (a few seconds each, in their Tune actors) that the driver is killed while one
# is between two checkpoints: at 15 steps a trial ended within the poll that saw its first report.
STEPS, EVERY, TRIALS = 300, 50, 3
OVERRIDES = [f"base.train.steps={STEPS}", f"report_every={EVERY}", f"trials={TRIALS}", "max_concurrent=2",
             "scheduler={type: fifo}"]
RUN_TIMEOUT_S = 600.0  # each driver run, generous for a loaded machine
POLL_S = 0.5


@dataclass
class SweepRun:
    out: Path
    stopped_trial: str  # asked to stop as it started
    resumed_trial: str  # had a checkpoint when the driver was killed
    events_at_kill: list[dict[str, Any]]
    first_rc: int  # the killed driver's return code
    resume: subprocess.CompletedProcess
    argv: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / SUMMARY_FILE).read_text())


def sweep_argv(out: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.sweep", "--spec", str(SPEC), "--out", str(out),
            *(a for o in OVERRIDES for a in ("--set", o))]


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path) -> Any:
    def found() -> Any:
        value = check()
        if not value and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        return value

    try:
        return wait_until(found, timeout_s=RUN_TIMEOUT_S, interval_s=POLL_S, what=what)
    except TimeoutError as e:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{e}: {log.read_text()[-3000:]}") from None


def _first_start(out: Path) -> str | None:
    return next((e["trial"] for e in read_events(out) if e["event"] == "start"), None)


def _ready_to_kill(out: Path, stopped: str) -> str | None:
    """Another trial with a checkpoint, once ``stopped`` has completed."""
    events = read_events(out)
    if not any(e["event"] == "complete" and e["trial"] == stopped for e in events):
        return None
    return next((e["trial"] for e in events if e["event"] == "result" and e["trial"] != stopped
                 and e["metrics"].get("step", STEPS) < STEPS), None)


def run_real_sweep(out: Path) -> SweepRun:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = sweep_argv(out)
    log = out.parent / f"{out.name}-first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stopped = _wait_for("a first trial", lambda: _first_start(out), proc, log)
        request_stop(out, stopped, "tests/support/sweeps.py")
        resumed = _wait_for("the stop and another trial's checkpoint", lambda: _ready_to_kill(out, stopped), proc, log)
        events_at_kill = read_events(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started
        proc.wait()
    resume = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True, timeout=RUN_TIMEOUT_S)
    return SweepRun(out, stopped, resumed, events_at_kill, proc.returncode, resume, argv)


@pytest.fixture(scope="session", name="real_sweep")
def real_sweep_fixture(tmp_path_factory) -> SweepRun:
    run = run_real_sweep(tmp_path_factory.mktemp("sweep") / "out")
    assert run.resume.returncode == 0, run.resume.stdout[-3000:] + run.resume.stderr[-3000:]
    return run


def attach(run: SweepRun, job_out: Path) -> None:
    """Copy the run's events, summary and stop requests to ``job_out`` (a sweep job's output folder)."""
    job_out.mkdir(parents=True, exist_ok=True)
    for name in (EVENTS_FILE, SUMMARY_FILE):
        shutil.copy(run.out / name, job_out / name)
    shutil.copytree(run.out / STOP_DIR, job_out / STOP_DIR, dirs_exist_ok=True)
