"""Adam preconditioning before selection: Adam's direction, AdamW at full density, its bookkeeping
and checkpoint round trip, and the config rule that needs top-k error feedback.
"""

import pytest
import torch

from tests.unit.workers.compression.fakes import FakeBucket, SoloState
from workers.compression import CompressionConfig, adam_direction, num_selected, topk_hook


def test_adam_direction_is_torch_adams_step() -> None:
    gen = torch.Generator().manual_seed(11)
    n = 500
    param = torch.zeros(n, requires_grad=True)
    adam = torch.optim.Adam([param], lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    m, v = torch.zeros(n), torch.zeros(n)
    for t in range(1, 4):
        grad = torch.randn(n, generator=gen) * t  # (n,)
        before = param.detach().clone()  # (n,)
        param.grad = grad.clone()
        adam.step()
        direction = adam_direction(grad, m, v, t, 0.9, 0.95, 1e-8)  # (n,)
        assert torch.allclose(before - param.detach(), direction, rtol=1e-5, atol=1e-7)
    assert torch.allclose(m, adam.state[param]["exp_avg"]) and torch.allclose(v, adam.state[param]["exp_avg_sq"])


def test_adam_precondition_at_full_density_is_adamw_through_plain_sgd() -> None:
    """The contract: hook with precondition adam + SGD(momentum 0, weight_decay wd) == AdamW(wd)."""
    gen = torch.Generator().manual_seed(12)
    w_sgd, w_adamw = torch.randn(40, generator=gen), None
    w_sgd.requires_grad_(True)
    w_adamw = w_sgd.detach().clone().requires_grad_(True)
    state = SoloState(CompressionConfig(density=1.0, precondition="adam"), parameters={"w": w_sgd})
    sgd = torch.optim.SGD([w_sgd], lr=0.01, momentum=0.0, weight_decay=0.1)
    adamw = torch.optim.AdamW([w_adamw], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(40, generator=gen)  # (n,)
        w_sgd.grad = topk_hook(state, FakeBucket(0, [w_sgd], grad.clone())).wait()  # (n,) dense fallback
        w_adamw.grad = grad.clone()
        sgd.step()
        adamw.step()
    assert state.dense_fallback_calls == 5 and torch.count_nonzero(state.residuals[0]) == 0
    assert torch.allclose(w_sgd, w_adamw, rtol=1e-5, atol=1e-6)


def test_adam_precondition_bookkeeping_and_checkpoint_round_trip() -> None:
    gen = torch.Generator().manual_seed(13)
    params = [torch.zeros(30, 10), torch.zeros(30)]
    named = {"w": params[0], "b": params[1]}
    n = 330
    config = CompressionConfig(density=0.1, precondition="adam", selection="exact")
    state = SoloState(config, parameters=named)
    k = num_selected(n, 0.1)
    m, v, residual = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    for t in range(1, 3):
        grad = torch.randn(n, generator=gen)  # (n,)
        out = topk_hook(state, FakeBucket(0, params, grad.clone())).wait()  # (n,)
        direction = adam_direction(grad, m, v, t, 0.9, 0.95, 1e-8)  # (n,) the same arithmetic, by hand
        assert torch.count_nonzero(out) == k
        # Exact: what is sent plus what stays equals the old residual plus this step's direction.
        assert torch.equal(out + state.residuals[0], residual + direction)
        residual = state.residuals[0].clone()  # (n,)
    flats = state._stores[0].flats
    assert torch.equal(flats["exp_avg"], m) and torch.equal(flats["exp_avg_sq"], v)
    assert not state.velocities

    saved = state.residual_state()
    assert set(saved) == {"steps"} | {f"{kind}/{name}" for kind in ("residual", "exp_avg", "exp_avg_sq")
                                      for name in ("w", "b")}
    restored = SoloState(config, parameters=named)
    restored.import_state(saved)
    grad = torch.randn(n, generator=gen)  # (n,)
    # Restored moments, residual and step count (bias correction) continue the run exactly.
    expected = topk_hook(state, FakeBucket(0, params, grad.clone())).wait()  # (n,)
    assert torch.equal(topk_hook(restored, FakeBucket(0, params, grad.clone())).wait(), expected)
    assert torch.equal(restored.residuals[0], state.residuals[0])

    # A checkpoint without moments (plain top-k) loads; a plain config drops saved moments.
    plain = SoloState(CompressionConfig(density=0.1), parameters=named)
    plain.import_state(saved)
    assert set(plain._pending["exp_avg"]) == set()
    assert set(plain._pending["residual"]) == {"w", "b"}


def test_config_rejects_adam_precondition_without_topk_error_feedback() -> None:
    for bad in ({"method": "none"}, {"error_feedback": False}, {"momentum": 0.9}):
        with pytest.raises(ValueError, match="precondition"):
            CompressionConfig(precondition="adam", **bad)
    with pytest.raises(ValueError):
        CompressionConfig(precondition="adam", adam_beta2=1.0)
    assert CompressionConfig().precondition == "none"
