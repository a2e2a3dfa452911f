"""Speed-aware split of the global batch across workers of different speeds.

In data parallelism every rank waits for the slowest at each gradient sync, so an equal split runs
a job of one fast and one slow device at twice the slow device's speed, not at the sum of both.
Here each rank's share of the global batch follows its measured throughput (tokens per second of
its own compute), re-measured every ``split_every`` steps and smoothed, so every rank's compute
takes about as long and nobody waits.

The update stays the equal split's update on the same global batch. DDP (and the compression
hooks) average gradients over ranks, i.e. compute ``(1/W) sum_r grad L_r``, where ``L_r`` is rank
r's mean loss over its own ``t_r`` tokens; the mean loss over the global batch of ``T`` tokens has
the gradient ``sum_r (t_r / T) grad L_r``. Each rank therefore scales its loss by
``W * t_r / T`` (``loss_weight``): exactly 1.0 when the shares are equal, so equal-speed runs
train bit for bit as before.

What this does not make equal: statistics taken over a rank's own batch (the MoE capacity limit,
``capacity_factor``, and the router's per-batch centring, ``router_centering``) see a different
batch on each rank, as they would with a different per-rank batch size; the auxiliary balance loss
(``balance: aux``, a per-batch regulariser, not a mean over tokens) is left unweighted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

# Fewest sequences a rank gets per step: every rank takes part in every collective with a batch.
MIN_ROWS = 1


def apportion(total: int, weights: Sequence[float], minimum: int = MIN_ROWS) -> list[int]:
    """``total`` rows split in proportion to ``weights`` (largest remainder), each at least ``minimum``.

    Deterministic (ties go to the lower rank), so every rank computes the same split from the same
    all-gathered weights.
    """
    n = len(weights)
    if n == 0 or total < n * minimum:
        raise ValueError(f"cannot split {total} rows over {n} ranks with at least {minimum} each")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    exact = [total * w / sum(weights) for w in weights]
    rows = [max(minimum, int(e)) for e in exact]
    while sum(rows) < total:  # the rows rounding left over: to the largest remainders
        rows[max(range(n), key=lambda i: (exact[i] - rows[i], -i))] += 1
    while sum(rows) > total:  # the floor raised some: back from the most over their share
        rows[max((i for i in range(n) if rows[i] > minimum), key=lambda i: (rows[i] - exact[i], -i))] -= 1
    return rows


def loss_weight(rows: int, total_rows: int, world: int) -> float:
    """The factor on a rank's mean loss that makes DDP's mean over ranks the global batch's mean
    loss (module docstring); sequences have one length, so rows stand for tokens. Integer
    arithmetic first: equal shares give exactly 1.0."""
    return world * rows / total_rows


class ForwardTimer:
    """Seconds of the model's forward pass on this rank, while armed.

    The forward pass is the part of a step with no collective when experts are not sharded (the
    dense gradients are synced inside backward, where a fast rank waits for the slow one), so its
    duration measures this rank's own speed; backward costs a fixed multiple of it. With expert
    parallelism the forward's all-to-alls wait for the slowest rank, so the measured speeds come
    out closer together than they are and the split moves less than it could (never the wrong
    way). On an accelerator the device is synchronised at both ends, only on measured steps.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.armed, self.seconds = device, False, 0.0
        self._t0 = 0.0
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "npu":
            torch.npu.synchronize(self.device)

    def _start(self, module: nn.Module, args: object) -> None:
        if self.armed:
            self._sync()
            self._t0 = time.perf_counter()

    def _stop(self, module: nn.Module, args: object, output: object) -> None:
        if self.armed:
            self._sync()
            self.seconds += time.perf_counter() - self._t0


class SpeedSplit:
    """Rows per rank of each global batch, following the ranks' smoothed throughputs.

    Starts equal. ``update`` is collective: every rank contributes its measured rows per second,
    every rank gets the same smoothed speeds and the same split.
    """

    def __init__(self, total_rows: int, world: int, rank: int, smoothing: float):
        self.total_rows, self.world, self.rank, self.smoothing = total_rows, world, rank, smoothing
        self.speeds: torch.Tensor | None = None  # (world,) rows per second, smoothed
        self.rows = apportion(total_rows, [1.0] * world)

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the global batch."""
        return sum(self.rows[: self.rank])

    @property
    def weight(self) -> float:
        return loss_weight(self.rows[self.rank], self.total_rows, self.world)

    def update(self, rows_per_s: float) -> None:
        """Collective: fold every rank's new measurement into the smoothed speeds; re-split."""
        measured = torch.zeros(self.world, dtype=torch.float64)
        measured[self.rank] = rows_per_s
        dist.all_reduce(measured)  # (world,) each rank's measurement
        if self.speeds is None:
            self.speeds = measured
        else:
            self.speeds = self.smoothing * measured + (1 - self.smoothing) * self.speeds
        self.rows = apportion(self.total_rows, self.speeds.tolist())
