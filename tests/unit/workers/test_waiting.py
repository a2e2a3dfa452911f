"""workers.waiting.wait_until: returns what the check found, bounded by its timeout."""

from __future__ import annotations

import time

import pytest

from workers.waiting import wait_until


class FakeTime:
    """A clock that moves only when slept on, so the test is exact and instant."""

    def __init__(self):
        self.now_s = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def test_returns_the_first_truthy_result():
    t = FakeTime()
    results = iter([None, 0, {}, {"state": "RUNNING"}])
    found = wait_until(lambda: next(results), timeout_s=10, interval_s=0.5, what="x",
                       clock=t.clock, sleep=t.sleep)
    assert found == {"state": "RUNNING"}
    assert t.sleeps == [0.5, 0.5, 0.5]


def test_times_out_after_a_last_check_at_the_deadline_and_names_what_it_waited_for():
    t = FakeTime()
    calls = []
    seen = {"state": "PENDING"}
    with pytest.raises(TimeoutError, match=r"waited 1.2 s for job a to run \(it is PENDING\)"):
        wait_until(lambda: calls.append(t.now_s), timeout_s=1.2, interval_s=0.5,
                   what=lambda: f"job a to run (it is {seen['state']})", clock=t.clock, sleep=t.sleep)
    assert calls == pytest.approx([0.0, 0.5, 1.0, 1.2])  # the last sleep is cut to the deadline


def test_an_exception_from_the_check_ends_the_wait():
    t = FakeTime()

    def check():
        raise RuntimeError("the server exited with 1")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(check, timeout_s=10, interval_s=0.5, what="x", clock=t.clock, sleep=t.sleep)
    assert t.sleeps == []


def test_real_clock_wait_is_bounded():
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, timeout_s=0.2, interval_s=0.05, what="nothing")
    assert 0.2 <= time.monotonic() - started < 5.0
