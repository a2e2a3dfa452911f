"""The MoE layer: routed experts as grouped SwiGLU weights, the top-k router with its balancing
bias and running logit centre, shared experts, capacity dropping (plain PyTorch, single process).

Expert parallelism replaces ``MoE.experts`` from outside (workers/moe/dispatch.py); the rest of the
model is in workers/moe/model.py.

Shape suffixes used in names and comments:
    D  model width (d_model)
    T  tokens in the batch (batch x sequence length)
    E  routed experts
    K  experts selected per token (top_k)
    A  token-expert assignments (T * K before capacity dropping; the kept ones after)
    F  hidden width of one routed expert (expert_hidden)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import ModelConfig

# Std of every weight at init (GPT-2 / nanoGPT); residual output projections get
# INIT_STD / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
INIT_STD = 0.02
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
    from batch to batch, and capacity dropping takes the overflow (the drop rate with centering is
    in BENCHMARKS.md, "MoE vs dense"). Like capacity dropping, it makes training-time routing depend
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
        # (T, D) dropped rows add 0; summed in the residual stream's dtype (autocast leaves y in bf16/fp16)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))
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
