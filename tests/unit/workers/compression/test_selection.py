"""workers.compression's pure pieces: top-k with exact error-feedback bookkeeping, sampled selection,
packing, the byte model and its dense fallback, the warm-up schedule.
"""

import pytest
import torch

from tests.unit.workers.compression.fakes import SoloState
from workers.compression import (
    SAMPLED_MIN_NUMEL,
    CompressionConfig,
    compress,
    decompress,
    num_selected,
    pack,
    sampled_topk_indices,
    scheduled_density,
    sparse_allgather_bytes,
    sparse_pays,
    topk_with_feedback,
    unpack,
)
from workers.compression.selection import _mask_positions as mask_positions


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_topk_with_feedback_bookkeeping_is_exact(density: float) -> None:
    gen = torch.Generator().manual_seed(1234)
    n = 10_007
    k = num_selected(n, density)
    residual = None
    for _ in range(5):
        grad = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)  # (n,)
        old = residual if residual is not None else torch.zeros(n)  # (n,)
        idx, vals, residual = topk_with_feedback(grad, residual, k, error_feedback=True)
        assert idx.dtype == torch.int64 and idx.shape == (k,) and vals.shape == (k,)
        assert idx.unique().numel() == k
        sent = torch.zeros(n).index_put_((idx,), vals)  # (n,)
        assert torch.equal(sent + residual, grad + old)
        # Top-k property: nothing left behind is larger than what was sent.
        if k < n:
            assert residual.abs().max() <= vals.abs().min()
        assert torch.count_nonzero(residual[idx]) == 0


@pytest.mark.parametrize("density", [0.01, 0.3])
def test_without_error_feedback_residual_is_dropped_and_same_topk_is_sent(density: float) -> None:
    gen = torch.Generator().manual_seed(7)
    n = 4_096
    k = num_selected(n, density)
    grad = torch.randn(n, generator=gen)  # (n,)
    grad_before = grad.clone()  # (n,)
    stale = torch.randn(n, generator=gen) * 100  # (n,) must be ignored
    idx, vals, residual = topk_with_feedback(grad, stale, k, error_feedback=False)
    assert residual is None
    ref_idx, ref_vals = compress(grad, k)
    assert set(idx.tolist()) == set(ref_idx.tolist())
    assert torch.equal(vals, grad[idx])
    # With EF but no residual yet, the same entries go out and grad itself is not modified.
    ef_idx, _, ef_residual = topk_with_feedback(grad, None, k, error_feedback=True)
    assert set(ef_idx.tolist()) == set(ref_idx.tolist())
    assert torch.equal(grad, grad_before)
    assert torch.equal(torch.zeros(n).index_put_((ef_idx,), grad[ef_idx]) + ef_residual, grad)


def test_num_selected_rounds_up_but_not_on_float_noise() -> None:
    assert num_selected(100, 0.07) == 7  # 0.07 * 100 == 7.000000000000001 in floats
    assert num_selected(33_000, 0.01) == 330
    assert num_selected(101, 0.01) == 2
    assert num_selected(10, 1e-6) == 1
    assert num_selected(10, 1.0) == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pack_unpack_round_trip_and_decompress_averages(dtype: torch.dtype) -> None:
    # Index 2**31 - 2 is a NaN bit pattern as float32: the bytes must still round-trip.
    idx_a = torch.tensor([0, 3, 2**31 - 2])  # (k,)
    idx_b = torch.tensor([3, 1])  # (c,) one pair short: padded with index n = 8
    vals_a = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)  # (k,)
    vals_b = torch.tensor([4.0, 5.0], dtype=dtype)  # (c,)
    payload_a, payload_b = pack(idx_a, vals_a, 3, pad_index=8), pack(idx_b, vals_b, 3, pad_index=8)
    assert payload_a.dtype == torch.uint8 and payload_a.numel() == 3 * (4 + dtype.itemsize)
    assert payload_b.numel() == payload_a.numel()
    all_idx, all_vals = unpack(torch.cat([payload_a, payload_b]), 3, dtype)
    assert all_idx.tolist() == [0, 3, 2**31 - 2, 3, 1, 8]
    assert torch.equal(all_vals, torch.cat([vals_a, vals_b, torch.zeros(1, dtype=dtype)]))
    keep = all_idx != 2**31 - 2
    dense = decompress(all_idx[keep], all_vals[keep], 8, 2)  # (8,) the padding index 8 is dropped
    assert dense.tolist() == [0.5, 2.5, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        pack(idx_a, vals_a, 2, pad_index=8)


def test_byte_model_and_dense_fallback_rule() -> None:
    # float32 pairs are 8 bytes, bfloat16 pairs 6; indices stay int32.
    assert sparse_allgather_bytes(100, 4, 2) == 800
    assert sparse_allgather_bytes(100, 2, 4) == 3 * 600
    # N = 2, n = 1000 float32: dense sends 4000 bytes, sparse 8k: pays iff k < 500.
    assert sparse_pays(1000, 499, 4, 4, 2) and not sparse_pays(1000, 500, 4, 4, 2)
    # N = 8: pays iff 8 * k * 8 < 8000, k < 125 (density < 1 / N); bf16 values: k < 1000 / 6.
    assert sparse_pays(1000, 124, 4, 4, 8) and not sparse_pays(1000, 125, 4, 4, 8)
    assert sparse_pays(1000, 166, 4, 2, 8) and not sparse_pays(1000, 167, 4, 2, 8)
    # A group of one compares the same formula: only sending everything does not pay.
    assert sparse_pays(1000, 999, 4, 4, 1) and not sparse_pays(1000, 1000, 4, 4, 1)


def test_warmup_schedule_is_dgc_exponential() -> None:
    final = 0.25 / 4**4  # DGC: 25%, 6.25%, 1.5625%, 0.39%, then ~0.1%
    got = [scheduled_density(t, final, 4, 0.25) for t in range(7)]
    assert got == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, final, final, final], rel=1e-12)
    assert scheduled_density(0, 0.01, 0, 0.25) == 0.01  # off
    # Monotone decrease over a longer warm-up, ending exactly at the density.
    longer = [scheduled_density(t, 0.001, 100, 0.25) for t in range(101)]
    assert all(a > b for a, b in zip(longer, longer[1:-1], strict=False)) and longer[-1] == 0.001
    # The hook's own step count drives it.
    state = SoloState(CompressionConfig(density=final, warmup_steps=4))
    state.steps = 2
    assert state.density == pytest.approx(0.015625)
    with pytest.raises(ValueError, match="warmup_start_density"):
        CompressionConfig(density=0.5, warmup_steps=3, warmup_start_density=0.25)


def _heavy_tailed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Log-normal magnitudes over six orders with random signs (gradient-like heavy tail)."""
    mag = torch.exp(3.0 * torch.randn(n, generator=gen))  # (n,)
    return mag * torch.sign(torch.randn(n, generator=gen))  # (n,)


@pytest.mark.parametrize("kind", ["normal", "cauchy", "heavy"])
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_sampled_selection_keeps_about_k_largest(kind: str, density: float) -> None:
    gen = torch.Generator().manual_seed(11)
    n = 300_000
    x = {
        "normal": lambda: torch.randn(n, generator=gen),
        "cauchy": lambda: torch.empty(n).cauchy_(generator=gen),
        "heavy": lambda: _heavy_tailed(n, gen),
    }[kind]()  # (n,)
    k = num_selected(n, density)
    kth = torch.topk(x.abs(), k).values.min()  # the exact k-th largest magnitude
    sample_gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = sampled_topk_indices(x, k, sample_gen)  # (c,)
        assert 0.9 * k <= idx.numel() <= k
        assert idx.unique().numel() == idx.numel()
        kept_min = x[idx].abs().min()
        # Nothing much smaller than the k-th largest is kept, nothing larger is left behind.
        assert kept_min >= 0.9 * kth
        left = torch.ones(n, dtype=torch.bool).index_fill_(0, idx, False)  # (n,)
        assert x.abs()[left].max() <= kept_min
    # Through compress (the hook's entry point) and with error feedback: bookkeeping stays exact.
    residual = torch.randn(n, generator=gen) * 0.1  # (n,)
    idx, vals, new_residual = topk_with_feedback(x, residual, k, True, "sampled", sample_gen)
    assert torch.equal(torch.zeros(n).index_put_((idx,), vals) + new_residual, x + residual)


@pytest.mark.parametrize("m", [1, 7, 8, 9, 1_003, 65_541])
def test_mask_positions_by_words_equals_nonzero(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    for p in (0.0, 0.01, 0.5, 1.0):
        mask = torch.rand(m + 3, generator=gen) < p  # (m + 3,)
        for view in (mask[:m], mask[3:]):  # word-aligned, and not (falls back to nonzero)
            assert torch.equal(mask_positions(view), view.nonzero().squeeze(1)), (m, p)


def test_sampled_selection_on_mostly_zero_bucket_sends_the_nonzeros() -> None:
    # An expert that saw no tokens: few non-zeros. Zeros carry nothing, so fewer than k go out.
    gen = torch.Generator().manual_seed(12)
    n = SAMPLED_MIN_NUMEL * 4
    x = torch.zeros(n)
    where = torch.randperm(n, generator=gen)[:50]
    x[where] = torch.randn(50, generator=gen)
    idx, vals = compress(x, num_selected(n, 0.01), "sampled", torch.Generator().manual_seed(0))
    assert set(idx.tolist()) == set(where.tolist()) and torch.equal(vals, x[idx])
