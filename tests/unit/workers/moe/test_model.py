"""Unit tests for workers/moe/model.py: router, balancing, capacity, MoE layer and the full model."""

import math

import pytest
import torch
import torch.nn.functional as F

from workers.moe.model import (
    CENTER_MOMENTUM,
    GroupedExperts,
    ModelConfig,
    MoE,
    MoETransformer,
    TopKRouter,
)
from workers.moe.stats import routing_stats

D_MODEL = 16


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared machine the thread
    pool's spinning made this file several times slower; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=16,
        d_model=D_MODEL,
        n_layers=2,
        n_heads=2,
        max_seq_len=16,
        n_routed_experts=4,
        n_shared_experts=1,
        expert_hidden=8,
        top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


def reference_moe(moe: MoE, x_TD: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loop: sum over kept chosen experts of gate * SwiGLU_e(x) plus the shared experts."""
    _, expert_TK, gates_TK = moe.router(x_TD)
    ex = moe.experts
    out = []
    for t in range(x_TD.shape[0]):
        y = moe.shared_experts(x_TD[t]) if moe.shared_experts is not None else torch.zeros_like(x_TD[t])
        for j in range(expert_TK.shape[1]):
            if keep_TK is not None and not keep_TK[t, j]:
                continue
            e = int(expert_TK[t, j])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            y = y + gates_TK[t, j] * (h @ ex.w2[e])
        out.append(y)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Router


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_k_distinct_experts_and_gates_sum_to_one(score_func):
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, n_experts=8, top_k=3, score_func=score_func, centering=False)
    scores, experts, gates = router(torch.randn(64, D_MODEL))
    assert scores.shape == (64, 8) and experts.shape == (64, 3) and gates.shape == (64, 3)
    assert all(len(set(row)) == 3 for row in experts.tolist())
    assert torch.allclose(gates.sum(-1), torch.ones(64), atol=1e-6)
    assert (gates > 0).all()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_bias_changes_selection_not_gate_source(score_func):
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, n_experts=8, top_k=2, score_func=score_func, centering=False)
    x = torch.randn(32, D_MODEL)
    scores0, experts0, _ = router(x)
    router.expert_bias[5] = 10.0  # far above any score range: expert 5 wins every token
    scores1, experts1, gates1 = router(x)
    assert torch.equal(scores0, scores1)  # bias never enters the scores
    assert (experts1 == 5).any(-1).all()
    assert not torch.equal(experts0, experts1)
    chosen = scores1.gather(1, experts1)
    assert torch.allclose(gates1, chosen / chosen.sum(-1, keepdim=True))


def test_bias_moves_toward_balance_on_skewed_batch():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(n_layers=1, bias_update_rate=0.05, capacity_factor=None,
                                       router_centering=False))
    moe = model.layers[0].moe
    u = F.normalize(torch.randn(D_MODEL), dim=0)
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.3)
        moe.router.gate.weight[0] = 3.0 * u  # expert 0 scores ~sigmoid(3) on every token
    x = u + 0.3 * torch.randn(64, D_MODEL)
    max_vios = []
    for _ in range(30):
        moe(x)
        counts = model.router_counts()
        max_vios.append(routing_stats(counts)[0]["max_vio"])
        model.update_router_bias(counts)
    assert max_vios[0] == pytest.approx(1.0)  # expert 0 takes all 64 tokens, mean load is 32
    assert max(max_vios[-5:]) < 0.7 * max_vios[0]  # the sign rule oscillates around balance
    bias = moe.router.expert_bias
    assert int(bias.argmin()) == 0 and bias[0] < 0


def test_update_router_bias_noop_unless_bias_balance():
    model = MoETransformer(tiny_config(balance="aux", router_centering=False))
    counts = torch.tensor([[10.0, 0, 0, 0, 1, 2, 3, 4, 0, 10]] * 2)
    model.update_router_bias(counts)
    assert all((m.router.expert_bias == 0).all() for m in model.moe_layers())
    assert all((m.router.logit_center == 0).all() for m in model.moe_layers())


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_centering_splits_tokens_that_share_an_offset(score_func):
    """Every token = a large common direction + a small own part: uncentred, all rank the experts
    alike and pick the same top_k; centred on the batch mean, the own parts decide."""
    torch.manual_seed(0)
    u = F.normalize(torch.randn(D_MODEL), dim=0)
    x = 5.0 * u + 0.2 * torch.randn(256, D_MODEL)  # (T, D)
    picks = {}
    for centering in (False, True):
        torch.manual_seed(1)
        router = TopKRouter(D_MODEL, n_experts=8, top_k=2, score_func=score_func, centering=centering)
        scores, experts, gates = router(x)
        picks[centering] = (scores, torch.bincount(experts.flatten(), minlength=8))
        chosen = scores.gather(1, experts)
        assert torch.allclose(gates, chosen / chosen.sum(-1, keepdim=True))  # gates: uncentred scores
    assert torch.equal(picks[False][0], picks[True][0])  # centering never enters the scores
    assert picks[False][1].max() == 256  # one expert takes every token
    assert picks[True][1].max() < 2 * 256 * 2 / 8  # centred: under twice the mean load


def test_centering_in_eval_uses_the_running_center():
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, n_experts=8, top_k=2, score_func="sigmoid", centering=True)
    x = 3.0 * F.normalize(torch.randn(D_MODEL), dim=0) + 0.2 * torch.randn(64, D_MODEL)
    _, train_experts, _ = router(x)
    batch_mean = router.last_logit_sum / 64
    router.eval()
    _, eval_experts, _ = router(x)  # logit_center is still 0: uncentred
    assert not torch.equal(eval_experts, train_experts)
    router.update_center(batch_mean)
    assert torch.allclose(router.logit_center, CENTER_MOMENTUM * batch_mean)
    router.logit_center.copy_(batch_mean)
    assert torch.equal(router(x)[1], train_experts)


def test_update_router_bias_moves_the_center_by_the_global_mean_logit():
    model = MoETransformer(tiny_config(balance="none"))  # E=4, top_k=2
    # as if summed over ranks: 10 tokens (20 assignments), logits summed over those tokens
    counts = torch.tensor([[5.0, 5, 5, 5, 10, -20, 0, 30, 0, 20]] * 2)
    model.update_router_bias(counts)
    for m in model.moe_layers():
        assert torch.allclose(m.router.logit_center, CENTER_MOMENTUM * torch.tensor([1.0, -2, 0, 3]))
        assert (m.router.expert_bias == 0).all()


# ---------------------------------------------------------------------------------------------
# Aux loss


def test_aux_loss_positive_with_router_grad():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(balance="aux", score_func="softmax"))
    model(torch.randint(0, 16, (2, 8)))
    aux = model.aux_loss()
    assert aux.ndim == 0 and aux.item() > 0
    aux.backward()
    grad = model.layers[0].moe.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_aux_loss_equals_coef_when_router_probs_uniform():
    # P_e = 1/E for every expert, so coef * E * sum_e f_e / E = coef whatever the loads are.
    cfg = tiny_config(balance="aux", aux_loss_coef=0.1)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
    moe.router.expert_bias.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))
    moe(torch.randn(8, D_MODEL))
    assert moe.last_aux_loss.item() == pytest.approx(0.1)


def test_aux_loss_zero_when_bias_balance():
    model = MoETransformer(tiny_config(balance="bias"))
    model(torch.randint(0, 16, (2, 8)))
    aux = model.aux_loss()
    assert aux.item() == 0.0 and not aux.requires_grad


# ---------------------------------------------------------------------------------------------
# MoE layer


@pytest.mark.parametrize("n_shared", [0, 2])
def test_moe_matches_per_token_reference(n_shared):
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_shared_experts=n_shared, capacity_factor=None))
    x = torch.randn(2, 5, D_MODEL)
    y = moe(x)
    assert y.shape == x.shape
    ref = reference_moe(moe, x.reshape(-1, D_MODEL))
    assert torch.allclose(y.reshape(-1, D_MODEL), ref, atol=1e-6)
    assert moe.shared_experts is None if n_shared == 0 else moe.shared_experts.w1.out_features == 16


def test_all_expert_params_get_grads_when_an_expert_is_empty():
    torch.manual_seed(0)
    moe = MoE(tiny_config())
    moe.router.expert_bias[3] = -10.0  # expert 3 never selected
    x = torch.randn(2, 6, D_MODEL, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 6, D_MODEL)
    assert moe.last_counts[3] == 0
    y.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
        assert (w.grad[3] == 0).all() and w.grad[:3].abs().sum() > 0


def test_full_model_all_params_get_grads_with_empty_expert():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config())
    model.layers[0].moe.router.expert_bias[0] = -10.0
    logits = model(torch.randint(0, 16, (2, 8)))
    assert model.router_counts()[0, 0] == 0
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_experts_module_is_replaceable():
    class Recording(torch.nn.Module):
        def __init__(self, inner: GroupedExperts):
            super().__init__()
            self.inner, self.calls = inner, []

        def forward(self, x, num_tokens_per_expert):
            self.calls.append(torch.as_tensor(num_tokens_per_expert).tolist())
            return self.inner(x, num_tokens_per_expert)

    torch.manual_seed(0)
    moe = MoE(tiny_config(capacity_factor=None))
    x = torch.randn(10, D_MODEL)
    expected = moe(x)
    moe.experts = Recording(moe.experts)
    assert torch.equal(moe(x), expected)
    assert sum(moe.experts.calls[0]) == 10 * 2 and len(moe.experts.calls[0]) == 4


# ---------------------------------------------------------------------------------------------
# Capacity


def skewed_moe(capacity_factor: float | None) -> MoE:
    """Every token picks experts 0 and 1 (bias far above the (0, 1) sigmoid scores)."""
    moe = MoE(tiny_config(capacity_factor=capacity_factor))
    moe.router.expert_bias.copy_(torch.tensor([10.0, 5.0, 0.0, 0.0]))
    return moe


def test_capacity_drops_lowest_gates_and_counts_them():
    torch.manual_seed(0)
    moe = skewed_moe(1.0).train()
    n_tokens, k, n_exp = 8, 2, 4
    x = torch.randn(n_tokens, D_MODEL)
    y = moe(x)
    capacity = math.ceil(1.0 * n_tokens * k / n_exp)  # 4
    # Experts 0 and 1 each get all 8 tokens; each keeps 4, so 4 + 4 assignments are dropped.
    expected_dropped = sum(max(load - capacity, 0) for load in [8, 8, 0, 0])
    counts = moe.last_counts
    assert counts[:4].tolist() == [8.0, 8.0, 0.0, 0.0] and counts[-2:].tolist() == [float(expected_dropped), 16.0]
    assert torch.allclose(counts[4:8], moe.router.gate(x).sum(0))  # logits summed over tokens
    assert routing_stats(counts[None])[0]["drop_frac"] == pytest.approx(8 / 16)

    # Score priority: each expert keeps the 4 tokens with the highest gate for it.
    _, expert_TK, gates_TK = moe.router(x)
    keep_TK = torch.zeros_like(gates_TK, dtype=torch.bool)
    for e in range(n_exp):
        g = torch.where(expert_TK == e, gates_TK, torch.full_like(gates_TK, -1.0))  # (T, K)
        flat = g.reshape(-1)
        chosen = flat.argsort(descending=True)[: min(capacity, int((expert_TK == e).sum()))]
        keep_TK.view(-1)[chosen] = True
    assert keep_TK.sum() == 16 - expected_dropped
    assert torch.allclose(y, reference_moe(moe, x, keep_TK), atol=1e-6)


def test_no_drops_without_capacity_or_in_eval():
    torch.manual_seed(0)
    x = torch.randn(8, D_MODEL)
    moe = skewed_moe(None).train()
    moe(x)
    assert moe.last_counts[-2] == 0 and moe.last_counts[-1] == 16

    moe = skewed_moe(1.0).eval()
    y = moe(x)
    assert moe.last_counts[-2] == 0
    assert torch.allclose(y, reference_moe(moe, x), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Full model


def test_forward_shapes_and_counts():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MoETransformer(cfg)
    assert model.router_counts().shape == (2, 10) and model.router_counts().sum() == 0
    logits = model(torch.randint(0, 16, (3, 7)))
    assert logits.shape == (3, 7, 16)
    counts = model.router_counts()
    assert counts.shape == (cfg.n_layers, 2 * cfg.n_routed_experts + 2) and not counts.requires_grad
    assert (counts[:, :4].sum(-1) == 3 * 7 * 2).all() and (counts[:, -1] == 3 * 7 * 2).all()
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(ValueError):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("balance", ["bias", "aux"])
def test_loss_decreases_on_repeating_sequence(balance):
    torch.manual_seed(0)
    cfg = tiny_config(d_model=32, balance=balance, bias_update_rate=0.01)
    model = MoETransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 3)  # period 8, inside the 16-token context
    idx = torch.stack([seq[:16], seq[4:20]])  # (2, 16)
    tgt = torch.stack([seq[1:17], seq[5:21]])  # (2, 16)
    losses = []
    for _ in range(30):
        logits = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(model.router_counts())
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_generate_length_context_crop_and_mode():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config()).train()
    out = model.generate(torch.randint(0, 16, (2, 5)), max_new_tokens=7)
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert ((out >= 0) & (out < 16)).all()
    assert model.training  # mode restored
    long_prompt = torch.randint(0, 16, (1, 20))  # longer than max_seq_len=16: cropped
    out = model.generate(long_prompt, max_new_tokens=3, top_k=4)
    assert out.shape == (1, 23) and torch.equal(out[:, :20], long_prompt)
    greedy = model.generate(long_prompt, max_new_tokens=3, temperature=0.0)
    assert torch.equal(model.generate(long_prompt, max_new_tokens=3, top_k=1), greedy)


# ---------------------------------------------------------------------------------------------
# Stats


def test_routing_stats_by_hand():
    counts = torch.tensor(
        [
            # loads (4), logit sums (4: ignored), dropped, total
            [6.0, 2.0, 0.0, 0.0, 9.0, -9.0, 9.0, 9.0, 1.0, 8.0],  # mean load 2, max 6 -> max_vio 2
            [2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0],  # perfectly balanced
        ]
    )
    s0, s1 = routing_stats(counts)
    assert s0["max_vio"] == pytest.approx(2.0)
    assert s0["drop_frac"] == pytest.approx(1 / 8)
    assert s0["load"] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert s1["max_vio"] == pytest.approx(0.0) and s1["drop_frac"] == 0.0
