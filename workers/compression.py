"""Gradient compression as DDP communication hooks: top-k with error feedback (DGC), or PowerSGD.

Why: cross-node (and cross-kind, gloo over host memory) gradient sync is bandwidth bound. Sending only
the k largest entries of each DDP bucket, as (index, value) pairs, cuts the bytes on the wire by about
``1 / (2 * density)``. What is not sent is kept per rank as a residual and added to the next step's
gradient (error feedback: Stich et al. 2018), so every gradient coordinate is applied eventually.
Deep Gradient Compression (Lin et al., ICLR 2018) adds what makes this converge at extreme ratios
(0.1% density); all of it is here, each part a ``CompressionConfig`` field:

- **Momentum correction with momentum factor masking** (``momentum``). Per rank, per bucket::

      u = m * u + g          # local velocity
      v = v + u              # accumulated velocity (the error-feedback residual)
      send top-k of v, then zero BOTH u and v at the sent indices

  The averaged sparse v that arrives IS the momentum-SGD update direction, so the optimizer must not
  apply momentum again. CONTRACT with the training loop when ``momentum > 0``: use
  ``torch.optim.SGD(params, lr=..., momentum=0, nesterov=False)``; its ``weight_decay`` (if any) is
  applied to the synced update without momentum (DGC folds it into g before the velocity instead; add
  ``wd / 2 * ||w||^2`` to the loss to get that). AdamW/Adam must not be used (their first moment
  would be a second momentum on top of this one). Momentum (and lr scaling) in the optimizer is off;
  the lr schedule still applies. A global ``clip_grad_norm_`` AFTER the sync should be off as well
  (clip locally with ``clip_norm``), because clipping the accumulated update distorts what error
  feedback has already accounted for.
- **Local gradient clipping** (``clip_norm``), before accumulation. Rule used here: each rank scales
  its bucket gradient ``g_b`` by ``min(1, (clip_norm / sqrt(N)) / ||g_b||_2)``. That is DGC's local
  clipping (threshold scaled by ``N^-1/2``, the share of one of N ranks whose independent gradients
  add up in norm like ``sqrt(N)``) applied per DDP bucket rather than to the whole model, because the
  hook sees one bucket at a time: with B buckets the whole-model local norm is bounded by
  ``sqrt(B) * clip_norm / sqrt(N)``. The dense fallback and the sparse path clip alike.
- **Density warm-up** (``warmup_steps``, ``warmup_start_density``): exponential decrease from the
  start density to ``density``, ``d(t) = d0 * (density / d0) ** (t / T)`` for hook step ``t < T``,
  ``density`` after (DGC: 25%, 6.25%, 1.5625%, 0.39%, 0.1% with ``T = 4``, one stage per epoch there,
  a smooth per-step curve here). The hook counts its own steps (``CommState.steps``).
- **Preconditioned top-k** (``precondition: adam``; ``adam_beta1``, ``adam_beta2``, ``adam_eps``). Top-k
  with error feedback feeding AdamW converges badly: a coordinate is sent in bursts (its accumulated
  residual, every ~1/density steps), Adam's second moment grows with the bursts and its normalisation
  shrinks them, so the total movement falls far short of dense AdamW's (1-bit Adam, Tang et al. 2021,
  makes the same observation: Adam's non-linear update does not commute with compression). Here each
  rank instead applies Adam's preconditioner to its OWN gradient first, with its own moments, which
  never leave the rank (as 1-bit Adam keeps the variance out of the compressed path), and error
  feedback compresses the resulting update direction, the quantity that is linear in what is applied
  (compress the update, not the gradient: as in DGC's momentum correction and 1-bit/0-1 Adam's
  compressed momentum). Per rank, per bucket, at hook step ``t = steps + 1``::

      g = local gradient (clipped locally with clip_norm, if set)
      m = b1 * m + (1 - b1) * g;   s = b2 * s + (1 - b2) * g^2        # exp_avg, exp_avg_sq
      d = (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)              # torch.optim.Adam's direction
      r = r + lr_scale * d;  send top-k of r, zero r at the sent indices # error feedback on d (below)

  The averaged sparse ``d`` that arrives is the update, so the hook has already done Adam's work.
  CONTRACT with the training loop when ``precondition == "adam"``: use
  ``torch.optim.SGD(param_groups, lr=<the AdamW lr schedule>, momentum=0, nesterov=False,
  weight_decay=<AdamW's weight_decay per group>)``. SGD without momentum applies ``p -= lr * (d + wd *
  p)``, which is AdamW's decoupled decay ``p *= 1 - lr * wd; p -= lr * d`` exactly, so use the same lr,
  schedule and weight decay (and no-decay groups) as AdamW would; betas and eps live in this config.
  A global ``clip_grad_norm_`` after the sync must be OFF (it would rescale an Adam direction, whose
  scale is already ~1 per coordinate); clip the raw gradient locally with ``clip_norm`` instead
  (before the moments; ``clip_norm * sqrt(N)`` reproduces a whole-model clip at that value on one
  bucket). With ``density`` 1 (or a dense fallback) and one rank this is AdamW exactly; on N ranks it
  is the average of the ranks' local Adam directions (each normalised by its own half-batch second
  moment), not Adam of the averaged gradient. Needs ``method: topk``, ``error_feedback``, ``momentum
  0``. Measured on the demo spec (2 workers, density 1%, 50x fewer bytes, 300 steps; final = mean
  training loss of the last 10% of steps; BENCHMARKS.md): 1.79 against 1.59 for dense AdamW (+12%;
  eval +15%), where top-k + error feedback into AdamW ends at 2.46 (+55%). Better than feeding
  AdamW, but NOT within a few percent of dense AdamW at equal steps: at 1% each coordinate is sent
  about once per 1/density steps, and the delayed, bursty movement leaves it behind.
- **Learning-rate-weighted error feedback** (whenever the hook sends the update: momentum correction
  or ``precondition: adam``). The training loop sets ``CommState.lr_scale = lr_t / peak lr`` before
  each step; the residual accumulates ``lr_scale * d`` (movement, in units of the peak lr), and what
  arrives is divided by this step's ``lr_scale`` because the optimizer multiplies it by ``lr_t``. So a
  coordinate that waits ``s`` steps moves by ``sum lr_t * d_t`` over them, as dense SGD at the
  scheduled lr would (the EF-SGD of Karimireddy et al. 2019 compresses ``lr_t * g_t + e_t`` for the
  same reason); accumulating the bare ``d`` would apply early, warm-up-lr directions at the peak lr
  and late ones at the small final lr. Measured on the demo spec at 300 steps: density 1% +12% vs
  dense (+20% with the bare ``d``); density 0.1% +31% (+27% with the bare ``d``; +21% vs +17% at
  900 steps). Where most coordinates are never sent (0.1%), the bare form's over-application of
  early directions happens to help; the weighted form is the one that is right for a schedule.
- **Selection by a sampled threshold** (``selection: sampled``) instead of a full ``torch.topk``:
  see ``sampled_topk_indices``. The sent count is within 10% of k and never above k.

Shape legend: ``n`` elements in a bucket, ``k`` entries selected per rank, ``c <= k`` entries actually
selected (sampled selection), ``N`` ranks in the group, ``M`` ranks after a resize, ``s`` samples.

Wire format (top-k). Each rank sends ONE uint8 payload of exactly ``k`` pairs, gathered with one
allgather (all_gather needs equal sizes on every rank): ``[k int32 indices | k values]`` as bytes.
Values are float32 (or float64 for float64 buckets), or bfloat16 with ``value_dtype: bfloat16``.
When fewer than k entries were selected (sampled selection, or fewer non-zeros than k), the payload is
padded with index ``n`` (one past the bucket's end) and value 0; ``decompress`` scatters into ``n + 1``
slots and drops the last, so padding never touches the gradient. Gradients are accumulated, selected
and averaged in float32 (float64 for float64 buckets), so residuals do not lose small updates to
half-precision rounding; the averaged result is rounded once into the bucket dtype. With bfloat16
values and error feedback on, the rounding error of each sent value (``v - float(bf16(v))``, exact in
float32) goes back into the residual at its index: nothing is lost, the bookkeeping stays exact.

Byte model (``wire_bytes`` and ``dense_bytes`` count bytes SENT BY THIS RANK, summed over buckets and
steps; protocol headers and the backend's choice of algorithm are not modelled):

- dense ring allreduce (reduce-scatter, then allgather; each sends ``(N-1)/N`` of the buffer):
  ``2 * (N-1) / N * n * elem_size`` (bucket dtype), counted as the integer
  ``2 * (N-1) * n * elem_size // N`` (exact whenever ``N`` divides it, e.g. ``N = 2``);
- ring allgather of the sparse payload: ``(N-1) * k * (4 + value_size)`` (8 bytes per pair for
  float32 values, 6 for bfloat16);
- **dense fallback** (``dense_fallback``, per bucket and step): the allgather only pays while
  ``N * k * (4 + value_size) < 2 * n * elem_size`` (about ``density < 1 / N`` for float32), the exact
  comparison of the two formulas above with ``(N-1)`` divided out. Otherwise that bucket is
  all-reduced densely: the residual is flushed into it (``g + residual``, or ``v`` with momentum, is
  sent whole and the residual becomes zero, except for the rounding into a half-precision bucket), and
  with momentum the velocity ``u`` is NOT masked, so such a bucket trains exactly as dense momentum
  SGD. ``CommState.dense_fallback_buckets`` holds the bucket indices that fell back in the last
  completed step, ``dense_fallback_calls`` counts them over all steps, and a change of the set is
  logged;
- PowerSGD (``method: powersgd``; PyTorch's own ``powerSGD_hook``, Vogels et al. 2019): for its first
  ``POWERSGD_START_ITER`` steps a dense allreduce of the bucket; then, per bucket, three allreduces,
  each counted as a ring allreduce of its element count: the tensors it does not compress (vectors,
  and matrices where ``(rows + cols) * rank * 2 >= rows * cols``) in one batch, then all P matrices
  (``rows * rank`` each), then all Q matrices (``cols * rank`` each) -- the same split that
  ``PowerSGDState.compression_stats`` reports in elements;
- ``N = 1``: nothing is sent, both counters stay 0 (compression is still applied, so a
  single-process run trains like one rank of a multi-process run).

``dense_bytes`` is what a dense allreduce of the same buckets sends (the baseline for the compression
ratio ``dense_bytes / wire_bytes``); ``wire_bytes`` is what the registered hook sent. For
``method: none`` both are the dense figure.

Checkpoints: world-size independent, keyed by PARAMETER NAME. ``CommState.export_state()`` is a
collective (every rank of the group calls it): it all-reduces each parameter's residual (and velocity,
and with ``precondition: adam`` the moments ``exp_avg`` and ``exp_avg_sq``) to the MEAN over the N ranks and returns the same dict on every rank, so one rank saves it.
``CommState.import_state(state)`` gives every one of the M new ranks that mean as its starting
residual/velocity. Rule: the next dense-equivalent update averages over ranks, so
``(1/M) * sum over the M new ranks of mean = mean = (1/N) * sum of the N old residuals``: the unsent
gradient mass is carried over exactly, whatever N and M (the same holds for the velocity). Inside a
run residuals live in bucket-flat buffers; a bucket's parameters (``bucket.parameters()``) and the
names recorded by ``register`` map name-keyed tensors onto a bucket lazily, the first time the bucket
is seen, and back to names when DDP rebuilds its buckets, so a residual always follows its parameter.
PowerSGD keeps its own error feedback by bucket index; it is not exported (a resumed PowerSGD run
loses one step's compression error), only ``steps`` is.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook inspects the hook's
# annotations at runtime and rejects the string "dist.GradBucket".
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from workers.config import CompressionConfig

logger = logging.getLogger(__name__)




# Float32 indices are int32 on the wire: a bucket must have fewer elements than this (the padding
# index n must fit as well).
MAX_BUCKET_NUMEL_INT32_INDEX = 2**31 - 1
INDEX_DTYPE = torch.int32
INDEX_BYTES = 4
# Relative slack on density * n before rounding up, so that e.g. 0.07 * 100 = 7.000000000000001
# selects 7 entries, not 8 (float error of one multiplication is ~1e-16 relative).
DENSITY_ROUNDING_SLACK = 1e-12
# Sampled selection: sample ~1% of the bucket, at least MIN_SAMPLE_NUMEL elements (with fewer, the
# expected number of sampled entries above the k-th largest, density * s, is too small to place a
# threshold). Buckets under SAMPLED_MIN_NUMEL elements use exact topk: the sample would be a large
# share of the bucket and the passes below cost more than a small topk.
SAMPLE_FRACTION = 0.01
MIN_SAMPLE_NUMEL = 4096
SAMPLED_MIN_NUMEL = 8 * MIN_SAMPLE_NUMEL
# The threshold is placed SAMPLE_MARGIN_SIGMAS binomial standard deviations (+1) below the expected
# top-k boundary in the sample, so that at least k candidates pass it with high probability (3 sigma:
# fewer than k in ~0.1% of calls); the exact top-k of the ~(1 + 3/sqrt(density * s)) * k candidates
# is then taken, so the common case selects exactly the top k.
SAMPLE_MARGIN_SIGMAS = 3.0
# Fewer than k candidates: send them (padded) if at least (1 - tolerance) * k; otherwise exact topk.
SAMPLED_COUNT_TOLERANCE = 0.1
# CPU passes over the bucket run in chunks of this many elements (4 MB of float32), so the |v| and
# mask temporaries stay in cache instead of two bucket-sized tensors (GPUs take the bucket in one go).
SELECTION_CHUNK_NUMEL = 1 << 20
# Bools read as one int64 word when looking for the candidates (see _mask_positions).
MASK_WORD = 8
# Seed of the per-device generators that draw the sample (any value; ranks need not agree).
SELECTION_SEED = 20180101
# PowerSGD: dense allreduce for the first steps (PyTorch requires > 1 with error feedback); kept small.
POWERSGD_START_ITER = 2
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# all_gather_single is the new name of all_gather_into_tensor (deprecated in torch 2.13 with a
# FutureWarning); both gather equal-sized tensors into one flat output and both work on gloo.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------------------
# Pure pieces: schedule, byte model, selection, bookkeeping, wire format.


def num_selected(n: int, density: float) -> int:
    """k = max(1, ceil(density * n)), at most n; one entry at least so every bucket makes progress."""
    return min(n, max(1, math.ceil(density * n * (1.0 - DENSITY_ROUNDING_SLACK))))


def scheduled_density(step: int, density: float, warmup_steps: int, warmup_start_density: float) -> float:
    """Density at hook step ``step``: exponential warm-up from the start density, then ``density``."""
    if step >= warmup_steps:
        return density
    return warmup_start_density * (density / warmup_start_density) ** (step / warmup_steps)


def payload_dtype_for(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are accumulated, selected and averaged in (see the module docstring)."""
    if grad_dtype == torch.float64:
        return torch.float64
    if grad_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"top-k compression supports floating-point buckets, got {grad_dtype}")


def dense_allreduce_bytes(n: int, elem_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of n elements: 2 * (N-1) / N * n * elem_size."""
    return 2 * (world_size - 1) * n * elem_size // world_size


def sparse_allgather_bytes(k: int, value_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allgather of its k (int32 index, value) pairs."""
    return (world_size - 1) * k * (INDEX_BYTES + value_size)


def sparse_pays(n: int, k: int, elem_size: int, value_size: int, world_size: int) -> bool:
    """True when the sparse allgather sends fewer bytes than the dense ring allreduce.

    ``(N-1) * k * pair < 2 * (N-1) / N * n * elem_size`` with ``(N-1)`` divided out, compared exactly in
    integers (no floor), so it also decides for a group of one (where both send nothing).
    """
    return world_size * k * (INDEX_BYTES + value_size) < 2 * n * elem_size


def _mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` as (c,) int64, increasing; faster for sparse masks (the candidates are ~1%).

    The bool mask is read as int64 words of MASK_WORD bools: ``nonzero`` runs over the n / 8 words
    (most are 0), then over the 8 bools of each non-zero word. A tail of fewer than 8 is done plainly.
    """
    m = mask.numel()
    whole = m - m % MASK_WORD
    if whole == 0 or mask.storage_offset() % MASK_WORD:
        return mask.nonzero().squeeze(1)  # (c,)
    words = mask[:whole].view(torch.int64)  # (whole / 8,)
    hit = words.ne(0).nonzero().squeeze(1)  # (w,) words holding a candidate
    row, col = mask[:whole].view(-1, MASK_WORD)[hit].nonzero().unbind(1)  # (c,), (c,)
    pos = hit[row].mul_(MASK_WORD).add_(col)  # (c,) increasing
    if whole < m:
        pos = torch.cat([pos, mask[whole:].nonzero().squeeze(1).add_(whole)])
    return pos


def sampled_topk_indices(
    acc: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (c,) int64 of c entries of largest |acc|, ``(1 - 10%) * k <= c <= k``, without a full topk.

    1. Draw s = max(MIN_SAMPLE_NUMEL, 1% of n) positions at random (with replacement); in the sample
       about ``k * s / n`` entries lie above the k-th largest magnitude of acc.
    2. ``thr`` = the ks-th largest sampled magnitude (``torch.topk`` on the sample), ks that expected
       count plus SAMPLE_MARGIN_SIGMAS binomial standard deviations, so thr most likely lies a bit
       BELOW the true k-th largest magnitude.
    3. One pass: candidates = positions with ``|acc| >= thr`` (``> 0`` if thr is 0: zeros carry
       nothing).
    4. More than k candidates: the exact top-k among them, which is then the exact top-k of acc (every
       entry above the k-th largest is a candidate). At most k: keep them all if at least 90% of k, or
       if thr is 0 (there are no more non-zeros); else, rarely, exact ``torch.topk`` on the bucket.
    Order of the returned indices is unspecified; they are unique.
    """
    n = acc.numel()
    s = min(n, max(MIN_SAMPLE_NUMEL, math.ceil(SAMPLE_FRACTION * n)))
    positions = torch.randint(n, (s,), generator=generator, device=acc.device)  # (s,)
    sample = acc[positions].abs_()  # (s,)
    expected = k * s / n
    ks = min(s, math.ceil(expected + SAMPLE_MARGIN_SIGMAS * math.sqrt(expected) + 1))
    thr = float(torch.topk(sample, ks, sorted=False).values.min())  # a sampled magnitude (exact float)
    positive = thr > 0

    chunk = n if acc.device.type != "cpu" else SELECTION_CHUNK_NUMEL
    mag = torch.empty(min(chunk, n), dtype=acc.dtype, device=acc.device)  # (chunk,) reused
    mask = torch.empty(min(chunk, n), dtype=torch.bool, device=acc.device)  # (chunk,) reused
    found = []
    for start in range(0, n, chunk):
        part = acc[start : start + chunk]  # (m,) view
        m = part.numel()
        torch.abs(part, out=mag[:m])
        if positive:
            torch.ge(mag[:m], thr, out=mask[:m])
        else:
            torch.gt(mag[:m], 0, out=mask[:m])
        found.append(_mask_positions(mask[:m]).add_(start))  # (c_chunk,)
    cand = torch.cat(found)  # (c,) candidates, increasing

    c = cand.numel()
    if c > k:
        return cand[torch.topk(acc[cand].abs(), k, sorted=False).indices]  # (k,)
    if c >= math.ceil((1.0 - SAMPLED_COUNT_TOLERANCE) * k) or not positive:
        return cand  # (c,)
    return torch.topk(acc.abs(), k, sorted=False).indices  # (k,) rare: threshold fell too high


def compress(
    acc: torch.Tensor,
    k: int,
    selection: Literal["exact", "sampled"] = "exact",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of largest magnitude: (indices int64, values in acc's dtype), unique indices.

    ``exact``: the k largest (``torch.topk``). ``sampled``: see ``sampled_topk_indices`` (c <= k
    entries; exact topk for buckets under SAMPLED_MIN_NUMEL elements). Order is unspecified.
    """
    n = acc.numel()
    if k >= n:
        idx = torch.arange(n, device=acc.device)  # (n,)
    elif selection == "sampled" and n >= SAMPLED_MIN_NUMEL:
        idx = sampled_topk_indices(acc, k, generator)  # (c,)
    else:
        idx = torch.topk(acc.abs(), k, sorted=False).indices  # (k,)
    return idx, acc[idx]


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
        idx, vals = compress(grad, k, selection, generator)
        return idx, vals, None
    acc = grad + residual if residual is not None else grad.clone()  # (n,) new tensor
    idx, vals = select_and_mask(acc, k, selection=selection, generator=generator)  # (c,), (c,)
    return idx, vals, acc


def pack(idx: torch.Tensor, vals: torch.Tensor, k: int, pad_index: int) -> torch.Tensor:
    """(c,) indices and (c,) wire values, c <= k -> one uint8 payload ``[k int32 indices | k values]``.

    The k - c missing pairs are (pad_index, 0); the hook pads with ``n``, which ``decompress`` drops.
    """
    pad = k - idx.numel()
    if pad < 0:
        raise ValueError(f"{idx.numel()} pairs do not fit a payload of {k}")
    idx32 = idx.to(INDEX_DTYPE)  # (c,)
    if pad:
        idx32 = torch.cat([idx32, torch.full((pad,), pad_index, dtype=INDEX_DTYPE, device=idx.device)])  # (k,)
        vals = torch.cat([vals, torch.zeros(pad, dtype=vals.dtype, device=vals.device)])  # (k,)
    return torch.cat([idx32.view(torch.uint8), vals.view(torch.uint8)])  # (k * (4 + value_size),)


def unpack(gathered: torch.Tensor, k: int, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * k * (4 + value_size),) gathered uint8 payloads -> indices (N*k,) int64, values (N*k,)."""
    per_rank = gathered.view(-1, k * (INDEX_BYTES + value_dtype.itemsize))  # (N, payload bytes)
    all_idx = per_rank[:, : k * INDEX_BYTES].contiguous().view(INDEX_DTYPE).reshape(-1).long()  # (N*k,)
    all_vals = per_rank[:, k * INDEX_BYTES :].contiguous().view(value_dtype).reshape(-1)  # (N*k,)
    return all_idx, all_vals


def decompress(all_idx: torch.Tensor, all_vals: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """Average of the N sparse contributions as a dense (n,) tensor; overlapping indices add up.

    Indices may be ``n`` (padding): they land in an extra slot that is dropped. index_add_ is
    deterministic on CPU (sequential); on CUDA it uses atomics, so the summation order of indices
    chosen by several ranks, and hence the last bit, may vary from run to run.
    """
    dense = torch.zeros(n + 1, dtype=all_vals.dtype, device=all_vals.device)  # (n + 1,)
    dense.index_add_(0, all_idx, all_vals)  # (n + 1,) sum over ranks; slot n collects padding
    return dense[:n].div_(world_size)  # (n,) mean over ranks


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


# ----------------------------------------------------------------------------------------------
# Per-rank state: bucket-flat buffers during a run, parameter names in checkpoints.

_KINDS = ("residual", "velocity", "exp_avg", "exp_avg_sq")


@dataclass
class _BucketStore:
    """The residual and velocity of one bucket, flat, for the layout ``key`` (ids of its parameters)."""

    key: tuple[int, ...]
    names: tuple[str, ...]
    numels: tuple[int, ...]
    flats: dict[str, torch.Tensor]  # kind -> (n,)


class CommState:
    """What the hooks keep between steps on one rank: config, group, residuals, counters.

    Residuals (and velocities) live per bucket index in flat buffers for the bucket's current layout
    (the ids of ``bucket.parameters()``, in order). When a bucket's layout changes (DDP rebuilds its
    buckets after the first iteration, in gradient-ready order) or a parameter turns up in another
    bucket, the buckets that held those parameters are split back into per-name tensors
    (``layout_changes`` counts them) and the new buckets are assembled from those names, so residuals
    follow their parameters and nothing is dropped. ``import_state`` fills the per-name pool directly.
    """

    def __init__(
        self,
        config: CompressionConfig,
        process_group: dist.ProcessGroup | None = None,
        parameters: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        # None: the default (WORLD) group.
        self.process_group = process_group
        params = dict(parameters or {})
        # id(parameter) -> name (register records the DDP module's trainable parameters).
        self.param_names = {id(p): name for name, p in params.items()}
        # name -> (numel, accumulation dtype), so export_state knows every parameter on every rank.
        self._param_meta = {name: (p.numel(), payload_dtype_for(p.dtype)) for name, p in params.items()
                            if p.is_floating_point()}
        self._device = next(iter(params.values())).device if params else torch.device("cpu")
        self._stores: dict[int, _BucketStore] = {}
        self._owner: dict[int, int] = {}  # id(parameter) -> bucket index holding its residual
        self._pending: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}  # kind -> name -> flat
        self._generators: dict[torch.device, torch.Generator] = {}
        self.powersgd: PowerSGDState | None = None
        # This step's learning rate over the peak one, set by the training loop before each backward
        # when the hook sends the update (see "Learning-rate-weighted error feedback" above).
        self.lr_scale = 1.0
        # PowerSGD: bucket index -> (names, numels) of its parameters when the hook last saw it, so
        # the error memories (PyTorch keeps them flat per bucket index) can be exported by name.
        self._psgd_layouts: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        # Bytes sent by this rank (see the module docstring): by the hook, and by a dense allreduce.
        self.wire_bytes = 0
        self.dense_bytes = 0
        # Completed iterations (hook calls on DDP's last bucket) and hook calls over all buckets.
        self.steps = 0
        self.bucket_calls = 0
        # Buckets whose residuals were split back into names because DDP changed their layout.
        self.layout_changes = 0
        # Bucket indices that fell back to a dense allreduce in the last completed step; all steps.
        self.dense_fallback_buckets: frozenset[int] = frozenset()
        self.dense_fallback_calls = 0
        self._fallback_now: set[int] = set()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def density(self) -> float:
        """The density the next step uses (warm-up applied)."""
        c = self.config
        return scheduled_density(self.steps, c.density, c.warmup_steps, c.warmup_start_density)

    @property
    def residuals(self) -> dict[int, torch.Tensor]:
        """Bucket index -> (n,) residual of the bucket's current layout (the live tensors)."""
        return {i: s.flats["residual"] for i, s in self._stores.items() if "residual" in s.flats}

    @property
    def velocities(self) -> dict[int, torch.Tensor]:
        """Bucket index -> (n,) momentum-correction velocity (the live tensors)."""
        return {i: s.flats["velocity"] for i, s in self._stores.items() if "velocity" in s.flats}

    def report(self) -> dict[str, Any]:
        """Counters for a progress line or a summary (this rank's bytes)."""
        return {
            "wire_bytes": self.wire_bytes,
            "dense_bytes": self.dense_bytes,
            "steps": self.steps,
            "density": self.density,
            "dense_fallback_buckets": sorted(self.dense_fallback_buckets),
            "dense_fallback_calls": self.dense_fallback_calls,
        }

    def _kinds(self) -> tuple[str, ...]:
        c = self.config
        if c.method == "powersgd":
            return ("residual",)  # PowerSGD's error memory (always on: use_error_feedback=True)
        if c.method != "topk" or not c.error_feedback:
            return ()
        if c.precondition == "adam":
            return ("residual", "exp_avg", "exp_avg_sq")
        return ("residual", "velocity") if c.momentum > 0 else ("residual",)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(SELECTION_SEED)
        return gen

    def _name(self, param: torch.Tensor) -> str:
        # Parameters register did not record (a CommState built by hand) get a process-local name.
        return self.param_names.get(id(param), f"<param {id(param):#x}>")

    def _release(self, index: int) -> None:
        """Split bucket ``index``'s flat buffers back into per-name tensors in the pending pool."""
        store = self._stores.pop(index)
        for kind, flat in store.flats.items():
            for name, part in zip(store.names, flat.split(store.numels), strict=True):
                self._pending[kind][name] = part.clone()
        for pid in store.key:
            self._owner.pop(pid, None)
        self.layout_changes += 1

    def _store(self, bucket: dist.GradBucket, n: int, dtype: torch.dtype, device: torch.device) -> _BucketStore:
        """The bucket's residual/velocity buffers for its current layout (see the class docstring)."""
        index = bucket.index()
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        store = self._stores.get(index)
        if store is not None and store.key == key:
            return store
        for holder in {self._owner[pid] for pid in key if pid in self._owner} | ({index} if store else set()):
            self._release(holder)
        names = tuple(self._name(p) for p in params)
        numels = tuple(p.numel() for p in params)
        if sum(numels) != n:
            raise ValueError(f"bucket {index}: parameters hold {sum(numels)} elements, the buffer {n}")
        flats = {}
        for kind in self._kinds():
            flat = torch.zeros(n, dtype=dtype, device=device)  # (n,)
            for name, part in zip(names, flat.split(numels), strict=True):
                saved = self._pending[kind].pop(name, None)
                if saved is not None:
                    if saved.numel() != part.numel():
                        raise ValueError(f"{kind} of {name!r} has {saved.numel()} elements, "
                                         f"the parameter {part.numel()}")
                    part.copy_(saved.reshape(-1))
            flats[kind] = flat
        store = self._stores[index] = _BucketStore(key, names, numels, flats)
        self._owner.update(dict.fromkeys(key, index))
        return store

    def _named(self, kind: str) -> dict[str, torch.Tensor]:
        """This rank's ``kind`` tensors by parameter name (views of live buffers, and pending ones)."""
        out = dict(self._pending[kind])
        for store in self._stores.values():
            if kind in store.flats:
                out.update(zip(store.names, store.flats[kind].split(store.numels), strict=True))
        if kind == "residual" and self.powersgd is not None:
            for index, error in self.powersgd.error_dict.items():
                names, numels = self._psgd_layouts[index]
                out.update(zip(names, error.split(numels), strict=True))
        return out

    def export_state(self, process_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Residuals (and velocities) averaged over ranks, by parameter name; a COLLECTIVE.

        Every rank of the group must call it (it is one allreduce when the group has more than one
        rank); every rank gets the same dict, on CPU, so one rank can save it. Keys:
        ``residual/<param name>`` and ``velocity/<param name>`` (with ``precondition: adam``:
        ``exp_avg/<param name>`` and ``exp_avg_sq/<param name>`` instead of velocity) (flat tensors, one per trainable
        parameter ``register`` recorded, zeros where this rank holds nothing), and ``steps`` (the hook's
        step count, so a resumed run continues the density warm-up). Sums are taken in float64.
        process_group None means the hook's group.
        """
        group = process_group if process_group is not None else self.process_group
        world_size = dist.get_world_size(group) if process_group is not None else self.world_size
        local = {kind: self._named(kind) for kind in self._kinds()}
        meta = dict(self._param_meta)
        for tensors in local.values():
            for name, t in tensors.items():
                meta.setdefault(name, (t.numel(), t.dtype))
        entries = [(kind, name) for kind in local for name in sorted(meta)]
        out: dict[str, torch.Tensor] = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        if not entries:
            return out
        flat = torch.cat([  # (total,) float64
            local[kind][name].reshape(-1).to(self._device, torch.float64) if name in local[kind]
            else torch.zeros(meta[name][0], dtype=torch.float64, device=self._device)
            for kind, name in entries
        ])
        if world_size > 1:
            dist.all_reduce(flat, group=group)  # (total,) sum over ranks
        flat = flat.div_(world_size).cpu()  # (total,) mean over ranks
        sizes = [meta[name][0] for _, name in entries]
        for (kind, name), part in zip(entries, flat.split(sizes), strict=True):
            out[f"{kind}/{name}"] = part.to(meta[name][1])
        return out

    def import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Start from ``export_state``'s result (any old world size): every rank gets the saved mean.

        Replaces all residuals and velocities held so far; they are mapped onto buckets by parameter
        name when each bucket is next seen. Unknown keys are an error; a residual or velocity the
        config does not use (error feedback or momentum off) is dropped with a warning, and so are
        residuals in the former per-bucket-index format (integer keys: they cannot be mapped to names).
        """
        pending: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
        steps = self.steps
        legacy = [key for key in state if isinstance(key, int)]
        if legacy:
            logger.warning("compression: %d per-bucket residuals of the former checkpoint format dropped",
                           len(legacy))
        for key, tensor in state.items():
            if isinstance(key, int):
                continue
            kind, _, name = key.partition("/")
            if key == "steps":
                steps = int(tensor)
            elif kind in _KINDS and name:
                pending[kind][name] = tensor.detach().reshape(-1).clone()
            else:
                raise ValueError(f"unknown compression state key {key!r}")
        for kind in _KINDS:
            if pending[kind] and kind not in self._kinds():
                logger.warning("compression: %d saved %s tensors dropped (not used by this config)",
                               len(pending[kind]), kind)
                pending[kind] = {}
        self._stores, self._owner, self._pending = {}, {}, pending
        if self.powersgd is not None:
            self.powersgd.error_dict.clear()
        self.steps = steps

    def residual_state(self) -> dict[str, torch.Tensor]:
        """THIS rank's state by parameter name (not averaged; no collective), for inspection.

        World-size dependent: checkpoints use ``export_state`` / ``import_state`` (workers/checkpoint.py).
        """
        state = {f"{kind}/{name}": t.detach().clone().cpu()
                 for kind in self._kinds() for name, t in self._named(kind).items()}
        state["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_residual_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore ``residual_state`` on the same rank and world size (checkpoints: ``import_state``)."""
        self.import_state(state)

    def _count(self, bucket: dist.GradBucket, dense: int, wire: int, fallback: bool = False) -> None:
        self.dense_bytes += dense
        self.wire_bytes += wire
        self.bucket_calls += 1
        if fallback:
            self._fallback_now.add(bucket.index())
            self.dense_fallback_calls += 1
        if bucket.is_last():
            now = frozenset(self._fallback_now)
            if now != self.dense_fallback_buckets:
                logger.info("compression: step %d: buckets %s all-reduced densely (sparse would not be "
                            "smaller at density %.4g)", self.steps, sorted(now) or "none", self.density)
            self.steps += 1
            self.dense_fallback_buckets = now
            self._fallback_now = set()


# ----------------------------------------------------------------------------------------------
# Hooks.


def topk_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: top-k (DGC) with error feedback, one async allgather of (index, value) pairs.

    DDP hands the hook the local, not yet averaged gradients; the returned future holds the bucket
    buffer overwritten with the average over ranks of each rank's sparse contribution (or, for a
    bucket where sparse does not pay, the dense average with the residual flushed into it).
    """
    buffer = bucket.buffer()  # (n,) local gradients, bucket dtype
    n = buffer.numel()
    if n >= MAX_BUCKET_NUMEL_INT32_INDEX:
        raise ValueError(f"bucket of {n} elements is too large for int32 indices; lower bucket_cap_mb")
    config = state.config
    world_size = state.world_size
    acc_dtype = payload_dtype_for(buffer.dtype)
    value_dtype = VALUE_DTYPES[config.value_dtype] if acc_dtype == torch.float32 else (
        torch.bfloat16 if config.value_dtype == "bfloat16" else torch.float64)
    k = num_selected(n, state.density)
    elem_size = buffer.element_size()
    dense = dense_allreduce_bytes(n, elem_size, world_size)  # 0 for a group of one
    fallback = config.dense_fallback and not sparse_pays(n, k, elem_size, value_dtype.itemsize, world_size)

    grad = buffer.to(acc_dtype)  # (n,) aliases buffer when already acc_dtype (it is overwritten anyway)
    if config.clip_norm is not None:
        limit = config.clip_norm / math.sqrt(world_size)
        norm = torch.linalg.vector_norm(grad)  # ()
        grad.mul_(torch.clamp(limit / (norm + 1e-12), max=1.0))  # (n,) no host sync
    flats = state._store(bucket, n, acc_dtype, buffer.device).flats if config.error_feedback else {}
    residual, velocity = flats.get("residual"), flats.get("velocity")
    if config.precondition == "adam":
        grad = adam_direction(grad, flats["exp_avg"], flats["exp_avg_sq"], state.steps + 1, config.adam_beta1,
                              config.adam_beta2, config.adam_eps)  # (n,) new tensor
    # The residual holds movement (update x lr / peak lr); what arrives is divided back by this step's
    # scale, because the optimizer multiplies it by this step's lr.
    scale = state.lr_scale if residual is not None else 1.0
    if not scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {scale}")
    acc = accumulate(grad, residual, velocity, config.momentum, scale) if residual is not None else grad  # (n,)

    if fallback:
        state._count(bucket, dense=dense, wire=dense, fallback=True)
        if acc is not buffer:
            buffer.copy_(acc)  # (n,) rounded into the bucket dtype
        if residual is not None:
            # Flushed: the residual keeps only the rounding into a half-precision bucket; the velocity
            # is not masked (every coordinate is sent, none is stale).
            if buffer.dtype == acc_dtype:
                residual.zero_()
            else:
                residual.sub_(buffer.to(acc_dtype))
        # Divide first, as DDP does, so low-precision sums do not overflow.
        buffer.div_(world_size * scale)
        if world_size == 1:
            return _completed(buffer)
        work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    generator = state._generator(buffer.device) if config.selection == "sampled" else None
    if residual is not None:
        idx, wire = select_and_mask(acc, k, velocity=velocity, selection=config.selection,
                                    value_dtype=value_dtype, generator=generator)  # (c,), (c,)
    else:
        idx, vals = compress(acc, k, config.selection, generator)  # (c,), (c,)
        wire = vals.to(value_dtype)  # (c,) the rounding error is lost with the rest of what is unsent
    state._count(bucket, dense=dense, wire=sparse_allgather_bytes(k, value_dtype.itemsize, world_size))

    if world_size == 1:
        buffer.copy_(decompress(idx, wire.to(acc_dtype), n, 1).div_(scale))  # (n,)
        return _completed(buffer)

    payload = pack(idx, wire, k, pad_index=n)  # (k * pair bytes,) uint8
    gathered = torch.empty(world_size * payload.numel(), dtype=torch.uint8, device=buffer.device)  # (N * ...,)
    work = _all_gather_single(gathered, payload, group=state.process_group, async_op=True)

    def _average(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises a failed allgather instead of averaging garbage
        all_idx, all_vals = unpack(gathered, k, value_dtype)  # (N*k,), (N*k,)
        buffer.copy_(decompress(all_idx, all_vals.to(acc_dtype), n, world_size).div_(scale))  # (n,) to bucket dtype
        return buffer

    return work.get_future().then(_average)


def allreduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the dense averaging allreduce (DDP's default), with byte counting."""
    buffer = bucket.buffer()  # (n,)
    world_size = state.world_size
    n = buffer.numel()
    dense = dense_allreduce_bytes(n, buffer.element_size(), world_size)  # 0 for a group of one
    state._count(bucket, dense=dense, wire=dense)
    if world_size == 1:
        return _completed(buffer)
    # Divide first, as DDP does, so low-precision sums do not overflow.
    buffer.div_(world_size)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def powersgd_wire_numels(bucket: dist.GradBucket, psgd: PowerSGDState) -> list[int]:
    """Element counts of the allreduces ``powerSGD_hook`` performs for this bucket at its current iter.

    Before ``start_powerSGD_iter``: one dense allreduce of the bucket. After: [uncompressed tensors
    (one batched allreduce, issued even when empty), all Ps, all Qs], with PyTorch's split: a tensor
    is viewed as (shape[0], rest) and compressed when ``(rows + cols) * r * min_compression_rate <
    rows * cols``, r = min(rows, cols, matrix_approximation_rank).
    """
    if psgd.iter < psgd.start_powerSGD_iter:
        return [bucket.buffer().numel()]
    uncompressed = ps = qs = 0
    for p in bucket.parameters():
        rows = p.shape[0] if p.dim() else 1
        cols = p.numel() // rows if rows else 0
        r = min(rows, cols, psgd.matrix_approximation_rank)
        if (rows + cols) * r * psgd.min_compression_rate < rows * cols:
            ps += rows * r
            qs += cols * r
        else:
            uncompressed += rows * cols
    return [uncompressed, ps, qs]


def powersgd_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: PyTorch's ``powerSGD_hook`` on ``state.powersgd``, with byte counting.

    Error memories restored by ``import_state`` (the mean over the old ranks, by name) are flushed
    into the bucket the first time it is seen: added to this rank's gradient before PowerSGD runs,
    which is where PowerSGD adds its own error memory, so nothing of them is lost. After a resume
    that first step is a dense allreduce (PowerSGD compresses from iteration POWERSGD_START_ITER),
    so the saved error is applied whole on the first update.
    """
    if state.powersgd is None:
        raise RuntimeError("CommState.powersgd is not set; use register(..., method='powersgd')")
    buffer = bucket.buffer()  # (n,)
    params = bucket.parameters()
    names = tuple(state._name(p) for p in params)
    numels = tuple(p.numel() for p in params)
    state._psgd_layouts[bucket.index()] = (names, numels)
    pending = state._pending["residual"]
    if pending:
        for name, part in zip(names, buffer.split(numels), strict=True):
            saved = pending.pop(name, None)
            if saved is not None:
                part.add_(saved.to(part))
    world_size = state.world_size
    elem_size = buffer.element_size()
    wire = sum(dense_allreduce_bytes(m, elem_size, world_size) for m in powersgd_wire_numels(bucket, state.powersgd))
    state._count(bucket, dense=dense_allreduce_bytes(buffer.numel(), elem_size, world_size), wire=wire)
    return powerSGD_hook(state.powersgd, bucket)


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    config: CompressionConfig,
    process_group: dist.ProcessGroup | None = None,
) -> CommState:
    """Register the hook for ``config.method`` on a DDP model; the state carries the byte counters.

    process_group None means the group the DDP model was built with (the default group unless one was
    given to DDP): the hook must talk to the same ranks as DDP. The names of the module's trainable
    parameters are recorded here: checkpoints (``export_state``) are keyed by them.
    """
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    params = {name: p for name, p in ddp_model.module.named_parameters() if p.requires_grad}
    state = CommState(config, process_group=process_group, parameters=params)
    if config.method == "powersgd":
        state.powersgd = PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=config.powersgd_rank,
            start_powerSGD_iter=POWERSGD_START_ITER,
            use_error_feedback=True,
            warm_start=True,
        )
        ddp_model.register_comm_hook(state, powersgd_hook)
    else:
        ddp_model.register_comm_hook(state, topk_hook if config.method == "topk" else allreduce_hook)
    return state
