"""Which entries of a bucket are sent: k from the density (and its warm-up), then exact or sampled top-k.

Why a sampled threshold: a full ``torch.topk`` over a 100M-element bucket costs seconds on a CPU; a
threshold placed from the top-k of a ~1% sample, then one pass over the bucket, takes a fraction of
that and keeps exactly the top k in the common case (BENCHMARKS.md, "Top-k selection").

Shapes: ``n`` elements in the bucket, ``k`` entries to select, ``c`` entries actually selected
(``c <= k``), ``s`` sampled positions, ``m`` elements in one chunk, ``w`` int64 words holding a candidate.
"""

import math
from typing import Literal

import torch

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


def num_selected(n: int, density: float) -> int:
    """k = max(1, ceil(density * n)), at most n; one entry at least so every bucket makes progress."""
    return min(n, max(1, math.ceil(density * n * (1.0 - DENSITY_ROUNDING_SLACK))))


def scheduled_density(step: int, density: float, warmup_steps: int, warmup_start_density: float) -> float:
    """Density at hook step ``step``: exponential warm-up from the start density, then ``density``.

    ``d(t) = d0 * (density / d0) ** (t / T)`` for ``t < T`` (DGC's 25% -> 0.1% as a smooth per-step
    curve instead of one stage per epoch).
    """
    if step >= warmup_steps:
        return density
    return warmup_start_density * (density / warmup_start_density) ** (step / warmup_steps)


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
