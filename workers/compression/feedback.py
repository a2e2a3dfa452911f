"""Error feedback, DGC momentum correction and the Adam preconditioner, on one flat bucket.

Why in place: the accumulator IS the residual (what was not sent stays in it), so selecting and
masking in place keeps the bookkeeping exact, bit for bit: every element of the accumulator lands
either in the payload or in the residual, never rounded (DESIGN.md, "Error feedback").

Shapes: ``n`` elements in the bucket, ``k`` entries to select, ``c <= k`` entries selected.
"""

import math
from typing import Literal

import torch

from workers.compression.selection import compress


def accumulate(
    grad: torch.Tensor, residual: torch.Tensor, velocity: torch.Tensor | None = None, momentum: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Error-feedback accumulation, in place: returns ``residual`` (the accumulator).

    Without velocity: ``residual += scale * grad``. With velocity (DGC momentum correction):
    ``velocity = momentum * velocity + grad``, then ``residual += scale * velocity``.
    """
    if velocity is not None:
        velocity.mul_(momentum).add_(grad)  # (n,) u
        return residual.add_(velocity, alpha=scale)  # (n,) v
    return residual.add_(grad, alpha=scale)  # (n,)


def adam_direction(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
    beta1: float, beta2: float, eps: float,
) -> torch.Tensor:
    """Adam's update direction from this rank's gradient, moments updated in place: a new (n,) tensor.

    ``m = b1 * m + (1 - b1) * g``, ``v = b2 * v + (1 - b2) * g^2``, returns
    ``(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` for step ``t >= 1`` -- the same arithmetic as
    ``torch.optim.Adam`` (non-fused), without lr and weight decay.
    """
    exp_avg.lerp_(grad, 1.0 - beta1)  # (n,) m
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # (n,) v
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)  # (n,)
    return exp_avg.div(denom).div_(1.0 - beta1**step)  # (n,)


def select_and_mask(
    acc: torch.Tensor,
    k: int,
    *,
    velocity: torch.Tensor | None = None,
    selection: Literal["exact", "sampled"] = "exact",
    value_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select from the accumulator and remove what is sent from it, in place: (indices, wire values).

    After the call ``scatter(float(wire values)) + acc == acc before``, exactly: the sent entries are
    zeroed in acc (and in velocity: momentum factor masking), except that when the wire dtype is
    narrower the rounding error ``value - float(wire value)`` stays in acc at its index (exactly
    representable, so nothing is lost).
    """
    idx, vals = compress(acc, k, selection, generator)  # (c,), (c,)
    wire = vals if value_dtype is None or value_dtype == vals.dtype else vals.to(value_dtype)  # (c,)
    acc.index_fill_(0, idx, 0)  # (n,)
    if wire is not vals:
        acc.index_copy_(0, idx, vals - wire.to(vals.dtype))  # (n,) rounding error kept
    if velocity is not None:
        velocity.index_fill_(0, idx, 0)  # (n,)
    return idx, wire


def topk_with_feedback(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    k: int,
    error_feedback: bool,
    selection: Literal["exact", "sampled"] = "exact",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One error-feedback step on a flat gradient: (indices, values, new residual); inputs untouched.

    acc = grad + residual; the selected entries are sent; the new residual is acc with the sent
    positions zeroed. The bookkeeping is exact, bit for bit: scatter(values at indices) + new residual
    == grad + residual, because each element of acc lands either in the payload or in the residual,
    never rounded. Without error feedback the residual is ignored and None is returned for it.
    grad and residual must share dtype and device.
    """
    if not error_feedback:
        idx, vals = compress(grad, k, selection, generator)  # (c,), (c,)
        return idx, vals, None
    acc = grad + residual if residual is not None else grad.clone()  # (n,) new tensor
    idx, vals = select_and_mask(acc, k, selection=selection, generator=generator)  # (c,), (c,)
    return idx, vals, acc
