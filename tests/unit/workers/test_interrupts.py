"""The loop's interrupts on their own (workers/interrupts.py): the preemption watch, and the hold
after a checkpoint asked for before a stop. (On Ray: tests/integration/training/test_elastic.py, tests/integration/training/test_train.py,
tests/integration/orchestrator/test_ray_jobs.py.)"""

from __future__ import annotations

from typing import Any

from workers.control import ControlChannel
from workers.interrupts import PreemptionWatch, hold


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_hold_waits_out_its_time_and_answers_a_late_request_with_the_same_step(tmp_path):
    channel, clock = ControlChannel(tmp_path), _Clock()
    first = channel.request_checkpoint("resize to 1 worker", hold_s=5.0)
    channel.confirm(first, 12)
    late: list[Any] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if not late and clock.now >= 1.0:  # the stopping driver's own request on SIGTERM
            late.append(channel.request_checkpoint("the driver got SIGTERM"))

    hold(first, channel, 0, 12, clock=clock, sleep=sleep)
    assert 5.0 <= clock.now < 5.2  # bounded: with no stop, training goes on
    assert late and channel.confirmation(late[0]).step == 12 and channel.pending() is None


def test_no_hold_by_default_and_other_ranks_only_wait(tmp_path):
    channel, clock = ControlChannel(tmp_path), _Clock()
    request = channel.request_checkpoint("test")
    assert request.hold_s == 0.0
    hold(request, channel, 0, 3, clock=clock, sleep=clock.sleep)
    assert clock.now == 0.0
    held = channel.request_checkpoint("stop", hold_s=1.0)
    hold(held, channel, 1, 3, clock=clock, sleep=clock.sleep)  # rank 1 never reads the folder
    assert 1.0 <= clock.now < 1.2 and channel.pending() == held


def test_preemption_watch_asks_only_every_k_steps(monkeypatch):
    import ray.train

    calls: list[int] = []
    notice = object()

    def get_preemption_info() -> Any:
        calls.append(1)
        return notice if len(calls) == 2 else None

    monkeypatch.setattr(ray.train, "get_preemption_info", get_preemption_info)
    watch = PreemptionWatch(5)
    seen = {done: watch.poll(done) for done in range(1, 21)}
    assert len(calls) == 2  # steps 5 and 10; after the notice no more (one checkpoint per attempt)
    assert [done for done, info in seen.items() if info is not None] == [10]
    assert PreemptionWatch(0).poll(5) is None and len(calls) == 2  # 0: never asks


def test_preemption_watch_turns_off_where_ray_has_no_notices(monkeypatch):
    import ray.train

    # Outside a Train v2 worker the real function raises (RuntimeError); Train v1 lacks it.
    assert PreemptionWatch(1).poll(1) is None
    monkeypatch.delattr(ray.train, "get_preemption_info")
    watch = PreemptionWatch(1)
    assert watch.poll(1) is None and watch.every == 0



def test_a_stop_request_reaches_every_rank(tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist

    from workers.interrupts import agreed_request

    channel = ControlChannel(tmp_path)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)  # one rank: its own flags
    assert agreed_request(channel, 0) is None
    asked = channel.request_checkpoint("the trial was asked to stop", stop=True)
    assert agreed_request(channel, 0) == asked and asked.stop and asked.hold_s == 0.0
    # Another rank reads no folder: the all-reduce hands it rank 0's flags (request, hold, stop).
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.copy_(torch.tensor([1.0, 0.0, 1.0])))
    seen = agreed_request(None, 1)
    assert seen is not None and seen.stop and seen.id == "-"


def test_a_request_older_than_the_attempt_gets_a_checkpoint_but_no_hold(tmp_path, monkeypatch):
    import time

    import torch.distributed as dist

    from workers.interrupts import agreed_request

    channel = ControlChannel(tmp_path)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    # A killed driver's SIGTERM request, never withdrawn, found by the next attempt:
    stale = channel.request_checkpoint("the driver got SIGTERM (job stopping)", hold_s=40.0, stop=True)
    seen = agreed_request(channel, 0, since=time.time() + 1.0)
    assert seen is not None and seen.id == stale.id and seen.hold_s == 0.0 and not seen.stop
    fresh = agreed_request(channel, 0, since=stale.requested_at)  # made during this attempt: as asked
    assert fresh.hold_s == 40.0 and fresh.stop
