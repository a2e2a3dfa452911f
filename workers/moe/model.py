"""MoE decoder-only transformer (plain PyTorch, single process; no Ray, no torch.distributed).

DeepSeekMoE layout: every block's FFN is many narrow routed experts (top_k of them per token)
plus always-on shared experts. Load balance is either auxiliary-loss-free (DeepSeek-V3: a
per-expert bias nudged toward balance after each optimizer step, used only to *select* experts)
or the classic Switch/GShard auxiliary loss.

This file holds no parallel code. Distributed callers work from outside:
- the training loop all-reduces ``router_counts()`` (SUM) and feeds the result to
  ``update_router_bias``, so every rank applies the same bias and running-centre update from
  global loads and logit sums;
- expert parallelism replaces ``MoE.experts`` (a ``GroupedExperts``) with a module of the same call
  signature that dispatches the expert-sorted rows by all-to-all; expert weights are stacked along
  dim 0 by global expert id, so they can be saved and sharded by id.

Shape suffixes used in names and comments:
    B  batch size (sequences)
    L  sequence length
    D  model width (d_model)
    H  attention heads
    C  channels per head (D // H)
    V  vocabulary size
    T  tokens in the batch (B * L)
    E  routed experts
    K  experts selected per token (top_k)
    A  token-expert assignments (T * K before capacity dropping; the kept ones after)
    F  hidden width of one routed expert (expert_hidden)
    N  transformer layers (n_layers)
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import ModelConfig

# Std of every weight at init (GPT-2 / nanoGPT); residual output projections get
# INIT_STD / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
INIT_STD = 0.02
# RoPE base period (RoFormer, Llama): wavelengths run from 2*pi to about 2*pi*ROPE_THETA positions.
ROPE_THETA = 10_000.0
# RMSNorm epsilon, added to the mean square before the reciprocal square root.
NORM_EPS = 1e-6
# Weight of the newest training batch in the router's running logit centre (BatchNorm's momentum).
CENTER_MOMENTUM = 0.1


# ----------------------------------------------------------------------------------------------
# Experts and routing


class GroupedExperts(nn.Module):
    """All routed experts of one layer as stacked SwiGLU weights, indexed by global expert id.

    Stacking (instead of a ModuleList of small MLPs) lets expert parallelism shard dim 0 by
    expert id and lets checkpoints store experts by global id, independent of world size. The
    input comes already sorted by expert, so each expert is one dense matmul on a contiguous slice.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # (E, D, F) gate proj
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # (E, D, F) up proj
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # (E, F, D) down proj
        self.init_weights(INIT_STD, INIT_STD)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x_AD: Tensor, num_tokens_per_expert: list[int] | Tensor) -> Tensor:
        """x_AD: rows sorted by expert; num_tokens_per_expert: rows of each expert, in order.

        Every expert runs, even on zero rows: the empty slice still links its weights into the
        graph, so each expert parameter gets a (zero) gradient and DDP sees no unused parameter.
        """
        if isinstance(num_tokens_per_expert, Tensor):
            num_tokens_per_expert = num_tokens_per_expert.tolist()  # one host sync (split sizes)
        if len(num_tokens_per_expert) != self.n_experts:
            raise ValueError(f"expected {self.n_experts} counts, got {len(num_tokens_per_expert)}")
        # unbind once: its backward stacks the per-expert grads, where w[e] would build E full-size zeros
        w1s, w3s, w2s = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)  # E x (D, F) / (F, D)
        out = []
        for e, x_aD in enumerate(torch.split(x_AD, num_tokens_per_expert, dim=0)):  # (a_e, D)
            h_aF = F.silu(x_aD @ w1s[e]) * (x_aD @ w3s[e])  # (a_e, F)
            out.append(h_aF @ w2s[e])  # (a_e, D)
        return torch.cat(out, dim=0)  # (A, D)


class FeedForward(nn.Module):
    """SwiGLU MLP; here the always-on shared experts, fused into one MLP of width F * n_shared.

    Shared experts hold common knowledge so the routed experts can specialise (DeepSeekMoE).
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., D)


class TopKRouter(nn.Module):
    """Chooses top_k distinct routed experts per token and their gate weights.

    ``expert_bias`` (DeepSeek-V3) enters only the *selection*: the gates come from the unbiased
    scores of the chosen experts, normalised to sum to 1 per token, so balancing steers which
    experts a token visits without distorting how much each one counts. Note that with top_k=1 the
    normalised gate is always 1 and the router learns nothing from the language-model loss.

    Centering (``centering=True``) also enters only the selection: the scores it ranks come from
    the logits minus their per-expert mean over this batch's tokens (in eval mode: minus
    ``logit_center``, a running mean of training batches). Early in training the hidden states
    of a batch share a large common direction, so every token ranks the experts alike and all of
    them go to the same top_k; the bias, one step per update, cannot follow that offset as it moves
    from batch to batch. Measured on the demo model (150 steps): 8.5% of assignments dropped
    without centering, 1.4% with it. Like capacity dropping, it makes training-time routing depend
    on the (per-rank) batch a token comes in.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, score_func: str, centering: bool):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.score_func = score_func
        self.centering = centering
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # Persistent buffers (saved in checkpoints) but no parameters: they move by the rules in
        # update_bias and update_center, never by gradients.
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)  # (E,)
        self.register_buffer("logit_center", torch.zeros(n_experts), persistent=True)  # (E,)
        self.last_logit_sum: Tensor | None = None  # (E,) this forward's logits summed over tokens

    def _score(self, logits_TE: Tensor) -> Tensor:
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)  # (T, E)
        return torch.softmax(logits_TE, dim=-1)  # (T, E)

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (scores (T, E) float32, expert ids (T, K) int64, gates (T, K) float32)."""
        logits_TE = self.gate(x_TD).float()  # (T, E) scores in fp32 for a stable top-k and softmax
        scores_TE = self._score(logits_TE)  # (T, E)
        self.last_logit_sum = logits_TE.detach().sum(dim=0)  # (E,)
        select_TE = scores_TE.detach()  # (T, E)
        if self.centering:
            center_E = self.last_logit_sum / logits_TE.shape[0] if self.training else self.logit_center  # (E,)
            select_TE = self._score(logits_TE.detach() - center_E)  # (T, E)
        _, expert_TK = torch.topk(select_TE + self.expert_bias, self.top_k, dim=-1)  # (T, K)
        gates_TK = scores_TE.gather(1, expert_TK)  # (T, K) unbiased scores of the chosen experts
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)  # (T, K) sums to 1 per token
        return scores_TE, expert_TK, gates_TK

    @torch.no_grad()
    def update_bias(self, load_E: Tensor, rate: float) -> None:
        """DeepSeek-V3's rule: raise the bias of under-loaded experts, lower it for over-loaded."""
        load_E = load_E.to(self.expert_bias)  # (E,)
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))  # (E,)

    @torch.no_grad()
    def update_center(self, mean_logit_E: Tensor) -> None:
        """Running mean of the training batches' mean logits, the eval-mode centre."""
        self.logit_center.lerp_(mean_logit_E.to(self.logit_center), CENTER_MOMENTUM)  # (E,)


class MoE(nn.Module):
    """DeepSeekMoE FFN: route -> sort by expert -> capacity drop -> experts -> gate -> scatter back.

    Records in each forward the raw routing counts (``last_counts``, detached float (2E + 2,):
    tokens per expert before capacity dropping, router logits summed over tokens per expert,
    dropped assignments, total assignments) so a caller can all-reduce them by SUM across ranks,
    and the auxiliary loss (``last_aux_loss``) when balance == "aux". ``self.experts`` may be
    replaced by any module with the call signature of ``GroupedExperts.forward`` (expert
    parallelism).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.balance = config.balance
        self.aux_loss_coef = config.aux_loss_coef
        self.router = TopKRouter(config.d_model, config.n_routed_experts, config.top_k, config.score_func,
                                 config.router_centering)
        self.experts = GroupedExperts(config.n_routed_experts, config.d_model, config.expert_hidden)
        self.shared_experts = (
            FeedForward(config.d_model, config.expert_hidden * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )
        self.last_counts: Tensor | None = None  # (2E + 2,)
        self.last_aux_loss: Tensor | None = None  # ()

    def capacity(self, n_tokens: int) -> int | None:
        """Max assignments one expert keeps; None (no cap) outside training or without a factor."""
        if not self.training or self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])  # (T, D)
        n_tokens, k, n_exp = x_TD.shape[0], self.top_k, self.n_experts
        scores_TE, expert_TK, gates_TK = self.router(x_TD)
        expert_A = expert_TK.reshape(-1)  # (A,) assignment a belongs to token a // K
        gates_A = gates_TK.reshape(-1)  # (A,)
        n_assign = expert_A.numel()
        load_E = torch.bincount(expert_A, minlength=n_exp)  # (E,) before capacity dropping

        capacity = self.capacity(n_tokens)
        if capacity is None:
            order_A = torch.argsort(expert_A, stable=True)  # (A,) assignments grouped by expert
            kept_E = load_E  # (E,)
        else:
            # Group by expert with the highest gate first inside each group, then keep each
            # group's first `capacity` rows: score-priority dropping, no per-token Python loop.
            by_gate_A = torch.argsort(gates_A.detach(), descending=True, stable=True)  # (A,)
            order_A = by_gate_A[torch.argsort(expert_A[by_gate_A], stable=True)]  # (A,)
            start_E = torch.cumsum(load_E, dim=0) - load_E  # (E,) first sorted row of each expert
            rank_A = torch.arange(n_assign, device=x.device) - start_E[expert_A[order_A]]  # (A,)
            order_A = order_A[rank_A < capacity]  # (A_kept,)
            kept_E = load_E.clamp(max=capacity)  # (E,)
        n_dropped = n_assign - order_A.numel()

        token_A = torch.div(order_A, k, rounding_mode="floor")  # (A_kept,) token of each kept row
        y_AD = self.experts(x_TD[token_A], kept_E)  # (A_kept, D) rows sorted by expert
        y_AD = y_AD * gates_A[order_A].unsqueeze(-1).to(y_AD.dtype)  # (A_kept, D)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)  # (T, D) dropped rows add 0
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)  # (T, D)

        extra = torch.tensor([n_dropped, n_assign], dtype=torch.float32, device=x.device)  # (2,)
        self.last_counts = torch.cat([load_E.float(), self.router.last_logit_sum, extra]).detach()  # (2E + 2,)
        if self.balance == "aux":
            # Switch/GShard: coef * E * sum_e f_e * P_e, minimal (= coef) when balanced. f_e is
            # not differentiable; the gradient reaches the router through P_e. Sigmoid scores are
            # normalised per token so P_e is a distribution for both score functions.
            f_E = load_E.float() / n_assign  # (E,) fraction of assignments routed to each expert
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)  # (T, E)
            p_E = probs_TE.mean(dim=0)  # (E,) mean router probability
            self.last_aux_loss = self.aux_loss_coef * n_exp * (f_E * p_E).sum()  # ()
        else:
            self.last_aux_loss = None
        return out_TD.reshape(shape)  # (..., D)


# ----------------------------------------------------------------------------------------------
# Attention and the transformer


def rope_tables(seq_len: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos and sin tables (L, C / 2) for rotary position embeddings (RoFormer)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (C/2,)
    angles_LC = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, C/2)
    return angles_LC.cos(), angles_LC.sin()


def apply_rope(x_BHLC: Tensor, cos_LC: Tensor, sin_LC: Tensor) -> Tensor:
    """Rotates each (i, i + C/2) channel pair by a position-dependent angle ("rotate half" form)."""
    x1, x2 = x_BHLC.chunk(2, dim=-1)  # (B, H, L, C/2) each
    cos_LC, sin_LC = cos_LC.to(x_BHLC.dtype), sin_LC.to(x_BHLC.dtype)
    return torch.cat([x1 * cos_LC - x2 * sin_LC, x1 * sin_LC + x2 * cos_LC], dim=-1)  # (B, H, L, C)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; SDPA picks the fused kernel per device."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BLD: Tensor, cos_LC: Tensor, sin_LC: Tensor) -> Tensor:
        b, seq, d = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(d, dim=-1)  # (B, L, D) each
        q, k, v = (t.view(b, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L, C)
        q, k = apply_rope(q, cos_LC, sin_LC), apply_rope(k, cos_LC, sin_LC)  # (B, H, L, C)
        y_BHLC = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, C)
        return self.proj(y_BHLC.transpose(1, 2).reshape(b, seq, d))  # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.moe = MoE(config)

    def forward(self, x_BLD: Tensor, cos_LC: Tensor, sin_LC: Tensor) -> Tensor:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos_LC, sin_LC)  # (B, L, D)
        return x_BLD + self.moe(self.ffn_norm(x_BLD))  # (B, L, D)


class MoETransformer(nn.Module):
    """Decoder-only language model with an MoE FFN in every block; the LM head is tied to the
    token embedding (fewer parameters, no quality loss at this scale).

    Routing bookkeeping is exposed for a distributed caller: ``router_counts`` (to all-reduce by
    SUM), ``update_router_bias`` (after the optimizer step) and ``aux_loss`` (add to the loss).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        head_dim = config.d_model // config.n_heads
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got d_model / n_heads = {head_dim}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # (V, D) tied
        cos_LC, sin_LC = rope_tables(config.max_seq_len, head_dim)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos_LC, persistent=False)  # (L_max, C/2)
        self.register_buffer("rope_sin", sin_LC, persistent=False)  # (L_max, C/2)
        self.init_weights()

    def init_weights(self) -> None:
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        for block in self.layers:
            nn.init.normal_(block.attn.qkv.weight, std=INIT_STD)
            nn.init.normal_(block.attn.proj.weight, std=out_std)
            moe = block.moe
            nn.init.normal_(moe.router.gate.weight, std=INIT_STD)
            moe.router.expert_bias.zero_()
            if isinstance(moe.experts, GroupedExperts):
                moe.experts.init_weights(INIT_STD, out_std)
            if moe.shared_experts is not None:
                nn.init.normal_(moe.shared_experts.w1.weight, std=INIT_STD)
                nn.init.normal_(moe.shared_experts.w3.weight, std=INIT_STD)
                nn.init.normal_(moe.shared_experts.w2.weight, std=out_std)

    def moe_layers(self) -> list[MoE]:
        return [block.moe for block in self.layers]

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, L) token ids -> logits (B, L, V); L must be <= max_seq_len."""
        seq = idx.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} > max_seq_len {self.config.max_seq_len}")
        cos_LC, sin_LC = self.rope_cos[:seq], self.rope_sin[:seq]  # (L, C/2)
        x_BLD = self.tok_emb(idx)  # (B, L, D)
        for block in self.layers:
            x_BLD = block(x_BLD, cos_LC, sin_LC)  # (B, L, D)
        return self.lm_head(self.norm(x_BLD))  # (B, L, V)

    def router_counts(self) -> Tensor:
        """(N, 2E + 2) from the last forward: per layer [tokens per expert before capacity
        dropping (E,), router logits summed over tokens (E,), dropped assignments, total
        assignments]. Sums over ranks are meaningful (SUM)."""
        n_exp = self.config.n_routed_experts
        device = self.tok_emb.weight.device
        rows = [
            m.last_counts if m.last_counts is not None else torch.zeros(2 * n_exp + 2, device=device)
            for m in self.moe_layers()
        ]
        return torch.stack(rows)  # (N, 2E + 2)

    @torch.no_grad()
    def update_router_bias(self, counts: Tensor) -> None:
        """Applies the auxiliary-loss-free bias rule (balance == "bias") and moves the routers'
        running logit centres (router_centering) from (possibly all-reduced) ``router_counts``.

        Call after the optimizer step of a training forward. Every rank must pass the same counts
        so the biases and centres stay identical across ranks.
        """
        n_exp, k = self.config.n_routed_experts, self.config.top_k
        for m, counts_row in zip(self.moe_layers(), counts, strict=True):  # (2E + 2,)
            if self.config.router_centering and counts_row[-1] > 0:
                m.router.update_center(counts_row[n_exp:2 * n_exp] * k / counts_row[-1])  # sum / tokens
            if self.config.balance == "bias":
                m.router.update_bias(counts_row[:n_exp], self.config.bias_update_rate)

    def aux_loss(self) -> Tensor:
        """Sum over layers of the last forward's auxiliary loss; zero unless balance == "aux"."""
        total = torch.zeros((), device=self.tok_emb.weight.device)
        for m in self.moe_layers():
            if m.last_aux_loss is not None:
                total = total + m.last_aux_loss
        return total

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = None
    ) -> Tensor:
        """Samples max_new_tokens after idx (B, L) -> (B, L + max_new_tokens). Runs in eval mode
        (no capacity dropping), then restores the previous mode. temperature <= 0 is greedy."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                ctx_BL = idx[:, -self.config.max_seq_len :]  # (B, <= L_max)
                logits_BV = self(ctx_BL)[:, -1, :]  # (B, V)
                if temperature <= 0:
                    next_B1 = logits_BV.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits_BV = logits_BV / temperature  # (B, V)
                    if top_k is not None:
                        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))  # (B, V)
                    probs_BV = torch.softmax(logits_BV, dim=-1)  # (B, V)
                    next_B1 = torch.multinomial(probs_BV, num_samples=1)  # (B, 1)
                idx = torch.cat([idx, next_B1], dim=1)  # (B, L + 1)
        finally:
            self.train(was_training)
        return idx


def routing_stats(counts: Tensor) -> list[dict]:
    """Per layer, from ``router_counts`` rows (N, 2E + 2), possibly summed over ranks:
    max_vio = max load / mean load - 1 (0 is perfect balance), drop_frac = dropped / total
    assignments, load = each expert's fraction of the assignments."""
    stats = []
    for row in counts.detach().float().cpu():  # (2E + 2,)
        n_exp = (row.numel() - 2) // 2
        load_E, dropped, total = row[:n_exp], float(row[-2]), float(row[-1])  # (E,)
        load_sum = float(load_E.sum())
        mean = load_sum / load_E.numel()
        stats.append(
            {
                "max_vio": float(load_E.max()) / mean - 1.0 if mean > 0 else 0.0,
                "drop_frac": dropped / total if total > 0 else 0.0,
                "load": (load_E / load_sum).tolist() if load_sum > 0 else [0.0] * load_E.numel(),
            }
        )
    return stats
