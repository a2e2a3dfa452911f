"""MoE decoder-only transformer (plain PyTorch, single process; no Ray, no torch.distributed)."""

from typing import Literal

from pydantic import Field, model_validator

from workers.config import Config


class ModelConfig(Config):
    vocab_size: int = Field(256, ge=2, le=1_000_000)
    d_model: int = Field(128, ge=8, le=16384)
    n_layers: int = Field(4, ge=1, le=256)
    n_heads: int = Field(4, ge=1, le=256)
    max_seq_len: int = Field(256, ge=8, le=131072)
    # Fine-grained routed experts (DeepSeekMoE): many narrow experts, top_k of them per token.
    n_routed_experts: int = Field(8, ge=1, le=1024)
    n_shared_experts: int = Field(1, ge=0, le=64)
    expert_hidden: int = Field(128, ge=4, le=65536)
    top_k: int = Field(2, ge=1, le=64)
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    # bias: auxiliary-loss-free balancing by a per-expert routing bias (DeepSeek-V3);
    # aux: the classic Switch/GShard auxiliary loss; none: no balancing.
    balance: Literal["bias", "aux", "none"] = "bias"
    bias_update_rate: float = Field(1e-3, ge=0.0, le=1.0)
    aux_loss_coef: float = Field(1e-2, ge=0.0, le=10.0)
    # Per-expert capacity = ceil(capacity_factor * tokens * top_k / n_routed_experts); None: no cap.
    capacity_factor: float | None = Field(1.25, ge=1.0, le=64.0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_routed_experts ({self.n_routed_experts})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self
