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
    N  transformer layers (n_layers)
    K  key positions attended to in one cached forward (the longest row's length after it)
(the MoE layer's own suffixes are in workers/moe/layers.py)
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.config import ModelConfig
from workers.moe.layers import (  # noqa: F401  (the MoE layer's names, re-exported with the model)
    CENTER_MOMENTUM,
    INIT_STD,
    FeedForward,
    GroupedExperts,
    MoE,
    TopKRouter,
)

# RoPE base period (RoFormer, Llama): wavelengths run from 2*pi to about 2*pi*ROPE_THETA positions.
ROPE_THETA = 10_000.0
# RMSNorm epsilon, added to the mean square before the reciprocal square root.
NORM_EPS = 1e-6


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


class KVCache:
    """Keys and values of every layer for B rows being generated, so that a new token attends to
    the stored prefix instead of recomputing it: a generated token costs one position's forward
    (O(L) attention) instead of the whole prefix's (O(L^2)).

    Row b holds ``lengths_B[b]`` valid positions. Slots at or beyond it are never attended to
    (``MoETransformer.forward`` admits a key only at a position <= its query's), so rows of
    different lengths share one tensor, and a right-padded prefill is valid once the caller sets
    ``lengths_B`` to the rows' true lengths (the padding's slots are overwritten later).
    """

    def __init__(self, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layers, batch, config.n_heads, config.max_seq_len, config.d_model // config.n_heads)
        self.k_NBHLC = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, H, L_max, C)
        self.v_NBHLC = torch.zeros(shape, device=device, dtype=dtype)  # (N, B, H, L_max, C)
        self.lengths_B = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)

    def keep(self, rows: Tensor) -> None:
        """Keeps only these rows, in this order (finished rows leave a running batch)."""
        self.k_NBHLC = self.k_NBHLC[:, rows]  # (N, B', H, L_max, C)
        self.v_NBHLC = self.v_NBHLC[:, rows]  # (N, B', H, L_max, C)
        self.lengths_B = self.lengths_B[rows]  # (B',)


class _CachedStep:
    """One cached forward's view of a KVCache: where each row's new tokens go and what they see."""

    def __init__(self, cache: KVCache, pos_BL: Tensor):
        self.cache = cache
        self.pos_BL = pos_BL  # (B, L) absolute position of each new token
        self.rows_BL = torch.arange(pos_BL.shape[0], device=pos_BL.device)[:, None].expand_as(pos_BL)  # (B, L)
        n_keys = int(pos_BL.max()) + 1
        keys_K = torch.arange(n_keys, device=pos_BL.device)  # (K,)
        self.mask_B1LK = (keys_K <= pos_BL[..., None]).unsqueeze(1)  # (B, 1, L, K) causal, per row

    def attend(self, layer: int, q_BHLC: Tensor, k_BHLC: Tensor, v_BHLC: Tensor) -> Tensor:
        """Stores this step's keys and values, then attends over each row's prefix and them."""
        n_keys = self.mask_B1LK.shape[-1]
        k_cache, v_cache = self.cache.k_NBHLC[layer], self.cache.v_NBHLC[layer]  # (B, H, L_max, C)
        k_cache[self.rows_BL, :, self.pos_BL] = k_BHLC.transpose(1, 2)  # (B, L, H, C) into their slots
        v_cache[self.rows_BL, :, self.pos_BL] = v_BHLC.transpose(1, 2)  # (B, L, H, C)
        return F.scaled_dot_product_attention(q_BHLC, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys],
                                              attn_mask=self.mask_B1LK)  # (B, H, L, C)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; SDPA picks the fused kernel per device."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BLD: Tensor, cos_LC: Tensor, sin_LC: Tensor,
                cached: tuple[_CachedStep, int] | None = None) -> Tensor:
        """cos/sin: (L, C/2), or (B, 1, L, C/2) per row with ``cached`` = (step, this layer's index)."""
        b, seq, d = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(d, dim=-1)  # (B, L, D) each
        q, k, v = (t.view(b, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L, C)
        q, k = apply_rope(q, cos_LC, sin_LC), apply_rope(k, cos_LC, sin_LC)  # (B, H, L, C)
        if cached is None:
            y_BHLC = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, C)
        else:
            y_BHLC = cached[0].attend(cached[1], q, k, v)  # (B, H, L, C)
        return self.proj(y_BHLC.transpose(1, 2).reshape(b, seq, d))  # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.moe = MoE(config)

    def forward(self, x_BLD: Tensor, cos_LC: Tensor, sin_LC: Tensor,
                cached: tuple[_CachedStep, int] | None = None) -> Tensor:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos_LC, sin_LC, cached)  # (B, L, D)
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

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for ``batch`` rows, on the model's device and in its dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch, weight.device, weight.dtype)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx (B, L) token ids -> logits (B, L, V); L must be <= max_seq_len.

        With ``cache``, idx holds each row's next L tokens: they take positions
        ``cache.lengths_B[b]`` onward, attend to the row's cached prefix, are stored, and the
        lengths grow by L. Eval mode only (capacity dropping would couple the rows).
        """
        seq = idx.shape[1]
        if cache is None:
            if seq > self.config.max_seq_len:
                raise ValueError(f"sequence length {seq} > max_seq_len {self.config.max_seq_len}")
            cos_LC, sin_LC = self.rope_cos[:seq], self.rope_sin[:seq]  # (L, C/2)
            cached = None
        else:
            pos_BL = cache.lengths_B[:, None] + torch.arange(seq, device=idx.device)  # (B, L)
            if int(pos_BL.max()) >= self.config.max_seq_len:
                raise ValueError(f"cached positions reach {int(pos_BL.max())} >= max_seq_len {self.config.max_seq_len}")
            cos_LC, sin_LC = self.rope_cos[pos_BL].unsqueeze(1), self.rope_sin[pos_BL].unsqueeze(1)  # (B, 1, L, C/2)
            cached = _CachedStep(cache, pos_BL)
        x_BLD = self.tok_emb(idx)  # (B, L, D)
        for i, block in enumerate(self.layers):
            x_BLD = block(x_BLD, cos_LC, sin_LC, None if cached is None else (cached, i))  # (B, L, D)
        if cache is not None:
            cache.lengths_B = cache.lengths_B + seq  # (B,)
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
        self, idx: Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = None,
        use_cache: bool = True, generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples max_new_tokens after idx (B, L) -> (B, L + max_new_tokens). Runs in eval mode
        (no capacity dropping), then restores the previous mode. temperature <= 0 is greedy.

        With ``use_cache`` each step feeds only the tokens not yet in a KV cache; once the sequence
        outgrows max_seq_len, every step recomputes the last max_seq_len tokens (their positions
        shift each step, so no cache holds), exactly as without the cache. ``generator``: the
        sampling RNG (default: torch's global one)."""
        was_training = self.training
        self.eval()
        cache = self.new_cache(idx.shape[0]) if use_cache else None
        try:
            for _ in range(max_new_tokens):
                if cache is not None and idx.shape[1] <= self.config.max_seq_len:
                    logits_BV = self(idx[:, int(cache.lengths_B[0]):], cache)[:, -1, :]  # (B, V)
                else:
                    logits_BV = self(idx[:, -self.config.max_seq_len :])[:, -1, :]  # (B, V)
                if temperature <= 0:
                    next_B1 = logits_BV.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits_BV = logits_BV / temperature  # (B, V)
                    if top_k is not None:
                        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))  # (B, V)
                    probs_BV = torch.softmax(logits_BV, dim=-1)  # (B, V)
                    next_B1 = torch.multinomial(probs_BV, num_samples=1, generator=generator)  # (B, 1)
                idx = torch.cat([idx, next_B1], dim=1)  # (B, L + 1)
        finally:
            self.train(was_training)
        return idx

