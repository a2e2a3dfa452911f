"""Weight-only int8 for serving: per-output-channel symmetric int8 weights, dequantized inside the
matmul (activations stay float).

Why own modules rather than ``torch.ao`` dynamic quantization: that converts ``nn.Linear`` only,
and most of an MoE's weights are the routed experts' raw ``(E, D, F)`` parameters
(``GroupedExperts``), which it skips. The router's gate (a discrete decision, and tiny) and the
embedding tied to the LM head stay float.

Shape suffixes: E routed experts, D model width, F expert hidden width, O/I a linear layer's
output/input features, A token-expert rows sorted by expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.moe.layers import FeedForward, GroupedExperts
from workers.moe.model import Attention, MoETransformer

INT8_MAX = 127  # symmetric range [-127, 127]: no asymmetric -128, so negation is exact


def quantize(weight: Tensor, reduce_dim: int) -> tuple[Tensor, Tensor]:
    """int8 weight and float scale per output channel: the max |w| over ``reduce_dim`` (the input
    features) maps to 127."""
    scale = weight.detach().abs().amax(dim=reduce_dim, keepdim=True).clamp(min=1e-12) / INT8_MAX
    q = torch.round(weight.detach() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.squeeze(reduce_dim).to(torch.float32)


class Int8Linear(nn.Module):
    """``nn.Linear`` without bias, weights int8 (O, I) with a scale per output channel (O,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q_OI, scale_O = quantize(linear.weight, reduce_dim=1)
        self.register_buffer("weight_q", q_OI)
        self.register_buffer("scale", scale_O)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_q.to(x.dtype)) * self.scale.to(x.dtype)  # (..., O)


class Int8GroupedExperts(nn.Module):
    """``GroupedExperts`` with int8 weights: one scale per expert and output channel."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.n_experts = experts.n_experts
        for name in ("w1", "w3", "w2"):  # (E, D, F), (E, D, F), (E, F, D): dim 1 is the input
            q, scale = quantize(getattr(experts, name), reduce_dim=1)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)  # (E, F) or (E, D)

    def forward(self, x_AD: Tensor, num_tokens_per_expert: list[int] | Tensor) -> Tensor:
        if isinstance(num_tokens_per_expert, Tensor):
            num_tokens_per_expert = num_tokens_per_expert.tolist()
        dt = x_AD.dtype
        out = []
        for e, x_aD in enumerate(torch.split(x_AD, num_tokens_per_expert, dim=0)):  # (a_e, D)
            if x_aD.shape[0] == 0:
                out.append(x_aD)
                continue
            gate_aF = (x_aD @ self.w1_q[e].to(dt)) * self.w1_scale[e].to(dt)  # (a_e, F)
            up_aF = (x_aD @ self.w3_q[e].to(dt)) * self.w3_scale[e].to(dt)  # (a_e, F)
            h_aF = F.silu(gate_aF) * up_aF  # (a_e, F)
            out.append((h_aF @ self.w2_q[e].to(dt)) * self.w2_scale[e].to(dt))  # (a_e, D)
        return torch.cat(out, dim=0)  # (A, D)


@dataclass(frozen=True)
class Int8Report:
    int8_params: int  # weight elements now held as int8
    total_params: int  # weight elements of the model before quantization

    @property
    def share(self) -> float:
        return self.int8_params / self.total_params


def quantize_model(model: MoETransformer) -> Int8Report:
    """Replaces, in place, the routed experts, attention projections and shared experts with int8
    modules (for inference: no gradients flow into int8 buffers)."""
    total = sum(p.numel() for p in model.parameters())
    int8 = 0
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.qkv, module.proj = Int8Linear(module.qkv), Int8Linear(module.proj)
            int8 += module.qkv.weight_q.numel() + module.proj.weight_q.numel()
        elif isinstance(module, FeedForward):
            module.w1, module.w3, module.w2 = (Int8Linear(m) for m in (module.w1, module.w3, module.w2))
            int8 += sum(m.weight_q.numel() for m in (module.w1, module.w3, module.w2))
    for moe in model.moe_layers():
        if isinstance(moe.experts, GroupedExperts):
            moe.experts = Int8GroupedExperts(moe.experts)
            int8 += sum(getattr(moe.experts, f"{n}_q").numel() for n in ("w1", "w3", "w2"))
    return Int8Report(int8_params=int8, total_params=total)
