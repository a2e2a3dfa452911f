"""A failed attempt's reason leads with the job's own error (orchestrator/controller/observe.py), whatever Ray's
message put before it; the real-Ray case is in tests/integration/orchestrator/test_ray_jobs.py."""

from __future__ import annotations

from orchestrator.controller.observe import REASON_MAX_CHARS, failure_reason, own_error
from orchestrator.ray_client import RayJobView

PREAMBLE = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):"
RUNTIME_ENV = "Runtime env is setting up.\n" * 2000  # far past the reason's length limit


def _failed(logs: str, exit_code: int | None = 1) -> RayJobView:
    return RayJobView("sub-1", "FAILED", message=f"{PREAMBLE}\n{logs}", exit_code=exit_code)


def test_the_last_error_line_leads_even_after_a_long_log():
    logs = RUNTIME_ENV + "error: first\n(RayTrainWorker pid=1) noise\nerror: data.source: folder /x does not exist\n"
    reason = failure_reason("j1", _failed(logs))
    assert reason == "error: data.source: folder /x does not exist (exit code 1; full log: orch logs j1)"


def test_without_an_error_line_the_last_tracebacks_exception_leads():
    logs = ("Traceback (most recent call last):\n  File \"a.py\", line 1\n    x()\nKeyError: 'a'\n\n"
            "During handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n  File \"b.py\", line 2, in <module>\n    y()\n"
            "RuntimeError: out of shards\nshutting down\n")
    assert own_error(logs) == "RuntimeError: out of shards"
    assert failure_reason("j2", _failed(logs, None)) == "RuntimeError: out of shards (full log: orch logs j2)"


def test_without_either_ray_and_the_last_line_say_it_within_the_limit():
    reason = failure_reason("j3", _failed(RUNTIME_ENV + "Killed\n" + "x" * 5000, exit_code=137))
    assert reason.startswith(f"Ray: {PREAMBLE} ... xxx") and reason.endswith("(exit code 137; full log: orch logs j3)")
    assert len(reason) == REASON_MAX_CHARS
    assert failure_reason("j4", RayJobView("sub-4", "FAILED")) == "Ray: driver failed (full log: orch logs j4)"
