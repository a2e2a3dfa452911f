"""The "checkpoint now" side channel on its own (the loop honouring it on Ray: tests/integration/training/test_train.py;
the controller asking before a stop: tests/unit/orchestrator/test_controller_cancel.py), and the driver's
SIGTERM handler that uses it."""

import signal
import subprocess
import sys

import pytest

from jobs.train import SIGTERM_GRACE_S
from tests.conftest import ROOT
from workers.control import ControlChannel
from workers.waiting import wait_until


def test_request_is_pending_until_confirmed(tmp_path):
    channel = ControlChannel(tmp_path)
    assert channel.pending() is None
    request = channel.request_checkpoint("resize to 4 workers")
    assert channel.pending() == request and channel.confirmation(request) is None
    done = channel.confirm(request, step=17)
    assert channel.pending() is None
    assert channel.confirmation(request) == done and (done.step, done.reason) == (17, "resize to 4 workers")


def test_a_newer_request_supersedes_an_older_one(tmp_path):
    channel = ControlChannel(tmp_path)
    first = channel.request_checkpoint("first")
    channel.confirm(first, step=3)
    second = channel.request_checkpoint("second")
    assert channel.pending() == second and channel.confirmation(second) is None
    channel.confirm(second, step=9)
    assert channel.pending() is None and channel.confirmation(first) is None  # one file: the latest answer


def test_unreadable_files_never_fail_the_loop(tmp_path):
    channel = ControlChannel(tmp_path)
    channel.root.mkdir(parents=True)
    (channel.root / "checkpoint_request.json").write_text("{half a req")
    assert channel.pending() is None
    assert not list(channel.root.glob(".*.tmp"))  # writes go through a temp file and a rename



def test_withdraw_takes_back_only_the_same_request(tmp_path):
    channel = ControlChannel(tmp_path)
    first = channel.request_checkpoint("first", hold_s=10.0)
    channel.withdraw(first)
    assert channel.pending() is None
    second = channel.request_checkpoint("second")
    channel.withdraw(first)  # a newer request stays
    assert channel.pending() == second


def test_wait_for_checkpoint_times_out_or_returns_the_confirmation(tmp_path):
    channel = ControlChannel(tmp_path)
    request = channel.request_checkpoint("stop")
    assert channel.wait_for_checkpoint(request, timeout_s=0.05, poll_s=0.01) is None
    channel.confirm(request, step=5)
    assert channel.wait_for_checkpoint(request, timeout_s=1.0).step == 5


DRIVER = """
import sys, time
from pathlib import Path
from jobs.train import _checkpoint_on_sigterm
_checkpoint_on_sigterm(Path(sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("loop_answers", [True, False])
def test_driver_asks_for_a_checkpoint_on_sigterm_then_stops(tmp_path, loop_answers):
    """The driver's SIGTERM handler (Ray Jobs' stop): it asks, waits for the loop's confirmation at
    most its grace, then ends by SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        channel = ControlChannel(tmp_path)
        proc.send_signal(signal.SIGTERM)
        request = wait_until(channel.pending, timeout_s=10, interval_s=0.01, what="the driver's request")
        assert request.reason == "the driver got SIGTERM (job stopping)"
        if loop_answers:
            assert proc.poll() is None  # still waiting for the loop
            channel.confirm(request, step=7)  # what rank 0 does after the step in flight
        assert proc.wait(timeout=SIGTERM_GRACE_S + 10) == -signal.SIGTERM
        assert (channel.confirmation(request) is not None) == loop_answers
    finally:
        proc.kill()
