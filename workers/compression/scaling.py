"""fp16 dynamic loss scaling in the top-k hook: residuals in unscaled units, one skip decision per step.

Why the hook unscales: under ``train.precision: fp16`` the step multiplies the loss by GradScaler's
scale S before backward, so DDP hands the hook ``S * g``. The hook runs INSIDE backward, before the
step could call ``GradScaler.unscale_``, so it divides by S itself before error feedback, and
multiplies what arrives back by S, so the step's ``unscale_`` / ``step`` / ``update`` run as usual.
GradScaler's scale is a power of two (init 2**16, growth 2, backoff 0.5: workers/device.py), so both
are exact: residuals, velocities and Adam moments hold what an fp32 run would hold, and a change of
S leaves them valid (DESIGN.md, "Loss scaling").

Why a guard, deferring the buckets: a step whose gradients overflowed is skipped by GradScaler, and
the hook's state must then be left exactly as it was, on every rank. DDP calls the hook bucket by
bucket while backward is still running, so when bucket 0 arrives nobody knows yet whether the last
bucket, or another rank, overflowed. The primary state's hook (DDP's) therefore only records each
bucket's local finiteness; on DDP's last bucket one all-reduce of a flag (also covering the extra
gradients DDP does not sync: the experts under expert parallelism) decides for every rank, and only
then are the buckets compressed, or, on a skip, filled with NaN so that every rank's GradScaler sees
the overflow, skips the optimizer step and lowers the scale together.
"""

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist


class LossScaleGuard:
    """This step's loss scale and, once every rank's gradients are in, whether the step is skipped.

    The hooks are handed the guard when they are made (``hooks.guarded_topk_hook``): DDP's, the
    primary, over ``process_group`` (``hooks.register`` sets it), and any secondary one
    (``ExpertGradSync``'s); the states hold no reference to it.

    Per step: the training step calls ``begin_step(scale)`` before backward; the primary
    hook ``defer``s each bucket (recording whether its local gradients are finite); on DDP's last
    bucket ``decide`` all-reduces one flag over the primary hook's group and hands the deferred
    buckets back to be compressed (or NaN-filled on a skip); the secondary hooks
    (``ExpertGradSync``'s, called after backward) read the decision. ``skipped_steps`` counts the
    steps skipped for a non-finite gradient on some rank.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None,
                 extra_params: Sequence[torch.Tensor] = ()) -> None:
        self.process_group = process_group  # the primary hook's (DDP's) group; None: the default group
        # Gradients outside the primary hook's buckets that must be finite too (synced later).
        self.extra_params = list(extra_params)
        self.scale = 1.0
        self.skip: bool | None = None  # None until this step's decision
        self.skipped_steps = 0
        self._deferred: list[tuple[dist.GradBucket, torch.futures.Future]] = []
        self._bad: list[torch.Tensor] = []  # () bool per deferred bucket: some local entry is inf/NaN

    def begin_step(self, scale: float) -> None:
        """Before each backward: the scale the loss is multiplied by this step (GradScaler.get_scale())."""
        if self._deferred:
            raise RuntimeError("the previous backward's buckets were never decided (DDP's last bucket did not arrive)")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"loss scale must be finite and > 0, got {scale}")
        self.scale, self.skip = float(scale), None

    def defer(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """Record one primary bucket and its local finiteness; its future completes after ``decide``."""
        if self.skip is not None:
            raise RuntimeError("the top-k hook ran again after this step was decided: call "
                               "LossScaleGuard.begin_step(scale) before every backward")
        self._bad.append(torch.isfinite(bucket.buffer()).all().logical_not())  # () no host sync
        fut: torch.futures.Future = torch.futures.Future()
        self._deferred.append((bucket, fut))
        return fut

    def decide(self) -> list[tuple[dist.GradBucket, torch.futures.Future]]:
        """Collective over the primary hook's group: skip iff any rank has a non-finite gradient.

        Returns the deferred (bucket, future) pairs, in DDP's order, for the hook to complete.
        The extra gradients are complete here: DDP's last bucket is ready only once every gradient
        it syncs is, and autograd accumulates a leaf's gradient as soon as it is computed (its
        AccumulateGrad node runs first), so the experts' gradients, computed upstream of the
        embedding's, are in.
        """
        bad = self._bad + [torch.isfinite(p.grad).all().logical_not()
                           for p in self.extra_params if p.grad is not None]
        flag = torch.stack(bad).any().to(torch.float32).reshape(1)  # (1,)
        if dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        self.skip = bool(flag.item())
        self.skipped_steps += self.skip
        deferred, self._deferred, self._bad = self._deferred, [], []
        return deferred
