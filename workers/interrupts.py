"""What can interrupt the training loop between two steps, agreed on by every rank.

- A "checkpoint now" request (workers/control.py): rank 0 reads the job's control folder after every
  step and one tiny all-reduce hands the decision, and how long to hold afterwards, to every rank.
  After the checkpoint a request made before a stop holds the loop (``hold``): no rank takes another
  step until the job is stopped, so its next attempt resumes from exactly the step the checkpoint
  holds. The hold is bounded: if no stop comes, training goes on and nothing is lost.
- A preemption notice from Ray Train (``PreemptionWatch``), asked every few steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from workers.control import CheckpointRequest, ControlChannel

HOLD_POLL_S = 0.1


def agreed_request(control: ControlChannel | None, rank: int, since: float = 0.0) -> CheckpointRequest | None:
    """Collective: the pending "checkpoint now" request, or None on every rank. Non-zero ranks get
    only the decision, the hold and the stop (id "-"). A request made before ``since`` (unix s: when
    this attempt started) was meant for an earlier attempt that ended unanswered (a driver killed
    before it could withdraw its request): it gets its checkpoint, but no hold and no stop."""
    req = control.pending() if control is not None and rank == 0 else None
    if req is not None and req.requested_at < since:
        req = req.model_copy(update={"hold_s": 0.0, "stop": False})
    flag = torch.tensor([1.0, req.hold_s, float(req.stop)] if req is not None else [0.0, 0.0, 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag[0].item() == 0:
        return None
    return req or CheckpointRequest(id="-", reason="", requested_at=0.0, hold_s=flag[1].item(),
                                    stop=bool(flag[2].item()))


def hold(request: CheckpointRequest, control: ControlChannel | None, rank: int, step: int,
         clock: Any = time.monotonic, sleep: Any = time.sleep) -> None:
    """Take no step for up to ``request.hold_s`` (the requester stops the job meanwhile). Rank 0 answers
    any request that comes in the while at once: the checkpoint at ``step`` is still the latest (the
    stopping driver's own request on SIGTERM is one)."""
    deadline = clock() + request.hold_s
    while clock() < deadline:
        if control is not None and rank == 0 and (late := control.pending()) is not None:
            control.confirm(late, step)
        sleep(HOLD_POLL_S)


class PreemptionWatch:
    """Ray Train's preemption notices, asked for every ``every`` steps.

    ``ray.train.get_preemption_info`` is a barrier across all ranks (rank 0's answer is broadcast),
    so it is asked at the same steps on every rank and not every step; a notice is answered with one
    checkpoint, and then no more is asked in this attempt (Ray restarts the group without the node).
    A Ray without notices (Train v1, where the function is missing, or a caller that is no Train v2
    worker, where it raises) turns the watch off: training goes on without it.
    """

    def __init__(self, every: int):
        self.every = every

    def poll(self, done: int) -> Any:
        """Collective when due: the PreemptionInfo (node id -> ranks, deadline) of a new notice, or None."""
        if not self.every or done % self.every:
            return None
        import ray.train

        try:
            info = ray.train.get_preemption_info()
        except (AttributeError, RuntimeError):
            info, self.every = None, 0
        if info is not None:
            self.every = 0
        return info


def describe_preemption(info: Any) -> str:
    nodes = ", ".join(f"node {node} (ranks {', '.join(map(str, sorted(ranks)))})"
                      for node, ranks in sorted(info.preempted_node_to_ranks.items()))
    deadline = "" if info.deadline_ms is None else f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s"
    return f"{nodes or 'a node of the job'}{deadline}"
