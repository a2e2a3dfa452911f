"""The compression hooks on one rank: momentum correction, residuals kept by name across bucket
rebuilds, the learning-rate-weighted error feedback, low-precision buckets, local clipping.
"""

import pytest
import torch

from tests.unit.workers.compression.fakes import FakeBucket, SoloState
from workers.compression import CompressionConfig, accumulate, num_selected, select_and_mask, topk_hook


def test_momentum_correction_bookkeeping_and_masking() -> None:
    gen = torch.Generator().manual_seed(21)
    n, m = 50_000, 0.9
    k = num_selected(n, 0.01)
    u = torch.randn(n, generator=gen)  # (n,) velocity
    v = torch.randn(n, generator=gen) * 3  # (n,) accumulated velocity (residual)
    for selection in ("exact", "sampled"):
        grad = torch.randn(n, generator=gen)  # (n,)
        u_new = u * m + grad  # (n,) expected velocity before masking
        v_old = v.clone()  # (n,)
        acc = accumulate(grad, v, u, m)
        assert acc is v and torch.equal(u, u_new)
        idx, vals = select_and_mask(v, k, velocity=u, selection=selection, generator=gen)  # (c,), (c,)
        assert 0.9 * k <= idx.numel() <= k
        sent = torch.zeros(n).index_put_((idx,), vals)  # (n,)
        assert torch.equal(sent + v, v_old + u_new)  # exact
        assert torch.count_nonzero(v[idx]) == 0 and torch.count_nonzero(u[idx]) == 0
        rest = torch.ones(n, dtype=torch.bool).index_fill_(0, idx, False)  # (n,)
        assert torch.equal(u[rest], u_new[rest])


def test_error_feedback_is_weighted_by_the_lr_schedule() -> None:
    """With lr_scale s_t set per step, the residual holds movement: lr x (what arrives) summed over the
    steps, plus peak lr x the residual, equals the sum over steps of lr_t x g_t, exactly as dense SGD
    at the scheduled lr would have moved; nothing is lost to an lr that changed while a coordinate waited."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.zeros(200)]
    state = SoloState(CompressionConfig(density=0.05, momentum=0.0), parameters={"w": params[0]})
    scales = [0.1, 0.5, 1.0, 0.8, 0.3, 0.05]
    moved, owed = torch.zeros(200, dtype=torch.float64), torch.zeros(200, dtype=torch.float64)
    for s in scales:
        g = torch.randn(200, generator=gen)  # (n,)
        state.lr_scale = s
        out = topk_hook(state, FakeBucket(0, params, g.clone())).wait()  # (n,) what the optimizer gets
        assert 0 < torch.count_nonzero(out) <= 10
        moved += s * out.double()  # the optimizer applies lr_t = s * peak lr
        owed += s * g.double()
    residual = state.residual_state()["residual/w"].double()
    assert torch.allclose(moved + residual, owed, rtol=0, atol=1e-5)
    state.lr_scale = 0.0
    with pytest.raises(ValueError, match="lr_scale"):
        topk_hook(state, FakeBucket(0, params, torch.zeros(200)))


def test_single_rank_hook_compresses_keeps_residuals_and_sends_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    params = [torch.zeros(30, 10), torch.zeros(30)]
    named = {"w": params[0], "b": params[1]}
    n = 330
    state = SoloState(CompressionConfig(density=0.1), parameters=named)
    k = num_selected(n, 0.1)
    grad = torch.randn(n, generator=gen)  # (n,)
    out = topk_hook(state, FakeBucket(0, params, grad.clone())).wait()  # (n,)
    assert torch.count_nonzero(out) == k
    assert torch.equal(out + state.residuals[0], grad)
    assert (state.wire_bytes, state.dense_bytes, state.steps, state.bucket_calls) == (0, 0, 1, 1)

    # Same layout: the residual is added to the next gradient.
    grad2 = torch.randn(n, generator=gen)  # (n,)
    residual = state.residuals[0].clone()  # (n,)
    out2 = topk_hook(state, FakeBucket(0, params, grad2.clone())).wait()  # (n,)
    assert torch.equal(out2 + state.residuals[0], grad2 + residual)
    assert state.layout_changes == 0

    # Checkpoint round trip (this rank's state by name): restored residuals are used again.
    saved = state.residual_state()
    assert set(saved) == {"residual/w", "residual/b", "steps"}
    restored = SoloState(CompressionConfig(density=0.1), parameters=named)
    restored.load_residual_state(saved)
    assert restored.steps == 2
    out3 = topk_hook(restored, FakeBucket(0, params, grad.clone())).wait()  # (n,)
    assert torch.equal(out3 + restored.residuals[0], grad + torch.cat([saved["residual/w"], saved["residual/b"]]))

    # Same element count, other order (as after DDP's bucket rebuild): the residual follows names.
    before = state.residuals[0].clone()  # (n,) [w | b]
    swapped = [params[1], params[0]]
    out4 = topk_hook(state, FakeBucket(0, swapped, grad.clone())).wait()  # (n,) [b | w]
    assert state.layout_changes == 1
    assert torch.equal(out4 + state.residuals[0], grad + torch.cat([before[300:], before[:300]]))
    # A bucket of another parameter: w and b go back to the pool by name, the new one starts at 0.
    topk_hook(state, FakeBucket(0, [torch.zeros(5)], torch.randn(5, generator=gen))).wait()
    assert state.layout_changes == 2 and state.residuals[0].numel() == 5
    assert set(state._pending["residual"]) == {"w", "b"}


def test_bucket_rebuild_and_import_apply_residuals_by_name_not_position() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b, c = torch.zeros(40), torch.zeros(8, 5), torch.zeros(20)
    named = {"a": a, "b": b, "c": c}
    config = CompressionConfig(density=0.1)
    state = SoloState(config, parameters=named)
    grad = torch.randn(100, generator=gen)  # (100,) [a | b | c]
    topk_hook(state, FakeBucket(0, [a, b, c], grad.clone())).wait()
    by_name = dict(zip("abc", state.residuals[0].clone().split([40, 40, 20]), strict=True))

    # Export (a group of one: no collective) and import into a fresh state whose DDP built two
    # buckets in another order: [c, a] and [b]. A zero gradient at density 1 flushes the residual.
    exported = state.export_state()
    assert set(exported) == {"steps", "residual/a", "residual/b", "residual/c"}
    fresh = SoloState(CompressionConfig(density=1.0), parameters=named)
    fresh.import_state(exported)
    out_b = topk_hook(fresh, FakeBucket(1, [b], torch.zeros(40))).wait()  # (40,)
    out_ca = topk_hook(fresh, FakeBucket(0, [c, a], torch.zeros(60))).wait()  # (60,)
    assert torch.equal(out_b, by_name["b"])
    assert torch.equal(out_ca, torch.cat([by_name["c"], by_name["a"]]))
    assert fresh.dense_fallback_buckets == {0, 1}  # density 1: nothing to gain from pairs
    assert all(torch.count_nonzero(r) == 0 for r in fresh.residuals.values())

    # A rebuild in one run (one bucket split in two, order changed) carries every residual over.
    state2 = SoloState(config, parameters=named)
    topk_hook(state2, FakeBucket(0, [a, b, c], grad.clone())).wait()
    kept = state2.residuals[0].clone()  # (100,)
    g_ba, g_c = torch.randn(80, generator=gen), torch.randn(20, generator=gen)
    out_ba = topk_hook(state2, FakeBucket(0, [b, a], g_ba.clone())).wait()  # (80,)
    out_c = topk_hook(state2, FakeBucket(1, [c], g_c.clone())).wait()  # (20,)
    assert torch.equal(out_ba + state2.residuals[0], g_ba + torch.cat([kept[40:80], kept[:40]]))
    assert torch.equal(out_c + state2.residuals[1], g_c + kept[80:])
    # A saved tensor of the wrong size is an error, not a silent misapplication.
    bad = SoloState(config, parameters=named)
    bad.import_state({"residual/a": torch.zeros(39)})
    with pytest.raises(ValueError, match="'a'"):
        topk_hook(bad, FakeBucket(0, [a], torch.zeros(40))).wait()
    with pytest.raises(ValueError, match="unknown"):
        bad.import_state({"residuals/a": torch.zeros(40)})


def test_momentum_hook_masks_and_keeps_exact_bookkeeping() -> None:
    gen = torch.Generator().manual_seed(6)
    n, m = 2_000, 0.9
    param = torch.zeros(n)
    state = SoloState(CompressionConfig(density=0.02, momentum=m), parameters={"p": param})
    u_expected = torch.zeros(n)  # (n,)
    v_before = torch.zeros(n)  # (n,)
    for _ in range(4):
        grad = torch.randn(n, generator=gen)  # (n,)
        u_expected = u_expected * m + grad  # (n,) before masking
        out = topk_hook(state, FakeBucket(0, [param], grad.clone())).wait()  # (n,)
        v, u = state.residuals[0], state.velocities[0]  # (n,), (n,)
        sent = out != 0  # (n,)
        assert int(sent.sum()) == num_selected(n, 0.02)
        assert torch.equal(out + v, v_before + u_expected)
        assert torch.count_nonzero(v[sent]) == 0 and torch.count_nonzero(u[sent]) == 0
        assert torch.equal(u[~sent], u_expected[~sent])
        u_expected, v_before = u.clone(), v.clone()


def test_bf16_values_keep_rounding_error_in_residual() -> None:
    gen = torch.Generator().manual_seed(8)
    n = 3_000
    param = torch.zeros(n)
    state = SoloState(CompressionConfig(density=0.05, value_dtype="bfloat16"), parameters={"p": param})
    residual_before = torch.zeros(n)  # (n,)
    for _ in range(3):
        grad = torch.randn(n, generator=gen) / 3  # (n,)
        out = topk_hook(state, FakeBucket(0, [param], grad.clone())).wait()  # (n,) float32 bucket
        residual = state.residuals[0]  # (n,)
        # What arrived is bf16-representable; bookkeeping is exact in float32.
        assert torch.equal(out, out.to(torch.bfloat16).float())
        assert torch.equal(out + residual, grad + residual_before)
        sent = out != 0  # (n,)
        assert int(sent.sum()) == num_selected(n, 0.05)
        # The rounding error stays where the value was sent: small but not all zero.
        err = residual[sent]  # (k,)
        assert torch.count_nonzero(err) > 0
        assert (err.abs() <= out[sent].abs() * 2**-8).all()
        residual_before = residual.clone()


def test_half_precision_bucket_accumulates_in_float32() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 1_000
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)  # (n,)
    state = SoloState(CompressionConfig(density=0.05))
    out = topk_hook(state, FakeBucket(0, [torch.zeros(n)], grad.clone())).wait()  # (n,)
    assert out.dtype == torch.bfloat16
    assert state.residuals[0].dtype == torch.float32
    # bf16 -> float32 is exact, so the bookkeeping is still exact in float32.
    assert torch.equal(out.float() + state.residuals[0], grad.float())


def test_local_clipping_bounds_each_bucket() -> None:
    gen = torch.Generator().manual_seed(9)
    n = 1_000
    param = torch.zeros(n)
    state = SoloState(CompressionConfig(density=1.0, clip_norm=2.0), parameters={"p": param})
    grad = torch.randn(n, generator=gen)  # (n,) norm ~ 31.6
    out = topk_hook(state, FakeBucket(0, [param], grad.clone())).wait()  # (n,) density 1: all of it
    assert torch.linalg.vector_norm(out) == pytest.approx(2.0, rel=1e-5)  # clip_norm / sqrt(1)
    assert torch.allclose(out, grad * (2.0 / torch.linalg.vector_norm(grad)))
    small = grad / 100  # (n,) under the limit: untouched
    assert torch.equal(topk_hook(state, FakeBucket(0, [param], small.clone())).wait(), small)


def test_config_rejects_momentum_without_topk_error_feedback() -> None:
    with pytest.raises(ValueError, match="momentum"):
        CompressionConfig(method="none", momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        CompressionConfig(momentum=0.9, error_feedback=False)
    with pytest.raises(ValueError):
        CompressionConfig(momentum=1.0)
    assert CompressionConfig().selection == "sampled" and CompressionConfig().momentum == 0.0
