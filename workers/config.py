"""The components' typed configs, torch-free so the control plane can validate specs.

Each component (model, compression, data, loop) has its config here and uses it from its own
module (``workers.moe.model.ModelConfig`` is this ``ModelConfig``); ``jobs/specs/train.py`` composes them
into a job spec. This module imports only pydantic: the orchestrator validates specs with the same
models and must never import torch. Unknown keys are errors and every field carries bounds, so a
typo in a spec fails before any Ray work starts.
"""

from __future__ import annotations

from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The byte-level tokenizer's vocabulary (workers/data/tokenizer.py): UTF-8 bytes, token 0 ends a document.
VOCAB_SIZE = 256
# One device vocabulary for specs, node pools, the API, the CLI and the docs: a worker's
# accelerator. cpu -> gloo, gpu -> nccl (NVIDIA), npu -> hccl (Ascend); see workers/device.py.
Device = Literal["cpu", "gpu", "npu"]
DEVICES: tuple[str, ...] = ("cpu", "gpu", "npu")
# Older words still accepted in specs, read as the word they stand for.
DEVICE_ALIASES: dict[str, str] = {"cuda": "gpu"}


def device_name(value: object) -> object:
    """A spec's device word in the vocabulary (``cuda`` -> ``gpu``); other values pass to validation."""
    return DEVICE_ALIASES.get(value, value) if isinstance(value, str) else value
DEFAULT_EXTENSIONS = (".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".rs", ".go", ".js", ".ts", ".java")


def _numeric(annotation: object) -> bool:
    """An int or float field (optional or not), but not one that also takes a boolean."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool not in args and any(a in (int, float) for a in args)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _strict_booleans(cls, data: object) -> object:
        """Numbers and booleans do not stand for each other: pydantic's lax mode reads ``false`` as 0
        and ``0`` or ``"yes"`` as a boolean, where a spec's author made a mistake to name (and JSON
        Schema, which the API publishes, refuses both); ``8.0`` for an int still passes."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if field is None:
                    continue
                if isinstance(value, bool) and _numeric(field.annotation):
                    raise ValueError(f"{name}: must be a number, not a boolean")
                if field.annotation is bool and not isinstance(value, bool):
                    raise ValueError(f"{name}: must be true or false")
        return data


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
    # Bias step per optimizer step (DeepSeek-V3: 1e-3 over trillions of tokens; a short run needs a
    # faster bias: BENCHMARKS.md, "MoE vs dense", measures the demo model at 3e-3).
    bias_update_rate: float = Field(3e-3, ge=0.0, le=1.0)
    # Select experts on router logits centred per expert over the batch (in eval: over a running
    # mean of training batches), so an offset shared by every token of the batch cannot send all of
    # them to the same experts. Gates keep the uncentred scores. See TopKRouter.
    router_centering: bool = True
    aux_loss_coef: float = Field(1e-2, ge=0.0, le=10.0)
    # Per-expert capacity = ceil(capacity_factor * tokens * top_k / n_routed_experts); None: no cap.
    capacity_factor: float | None = Field(1.25, ge=1.0, le=64.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_routed_experts ({self.n_routed_experts})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


# Fields that only method "local" reads (an explicit value with another method is a spec error).
LOCAL_FIELDS = ("local_steps", "value_bits", "outer_lr", "error_decay")


class CompressionConfig(Config):
    # none: dense allreduce (still byte-counted); topk: sparse (index, value) allgather with the DGC
    # tricks below; powersgd: PyTorch's PowerSGD hook (low-rank), for comparison; local: local_steps
    # optimizer steps per worker with no gradient sync, then a chunk-wise top-k + error-feedback sync
    # of the weights' change (workers/compression/DESIGN.md, "Local steps").
    method: Literal["none", "topk", "powersgd", "local"] = "topk"
    # Fraction of each bucket's elements sent per step (after the warm-up); method local: of each
    # chunk's elements sent per outer sync.
    density: float = Field(0.01, gt=0.0, le=1.0)
    # method local: optimizer steps between two outer syncs (1: a sync after every step).
    local_steps: int = Field(8, ge=1, le=100_000)
    # method local: bits per sent value (2, 4, 8: codes with one float32 scale per chunk; 32: float32).
    value_bits: Literal[2, 4, 8, 32] = 8
    # method local: the start weights move by outer_lr times the averaged sent change.
    outer_lr: float = Field(1.0, gt=0.0, le=10.0)
    # method local: the error-feedback accumulator is multiplied by this before each round's change
    # is added (1: plain error feedback; < 1 forgets stale mass, as SparseLoCo's beta).
    error_decay: float = Field(0.95, ge=0.0, le=1.0)
    # Keep what was not sent and add it to the next step's gradient (Stich et al. 2018).
    error_feedback: bool = True
    # DGC momentum correction, 0 = off (e.g. 0.9). The optimizer must then be plain SGD without
    # momentum: see workers/compression/DESIGN.md for the exact contract. Needs topk and error_feedback.
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    # DGC local clipping: each rank's bucket gradient to L2 norm clip_norm / sqrt(N), before
    # accumulation; None = off.
    clip_norm: float | None = Field(None, gt=0.0, le=1e6)
    # Density warm-up over the first warmup_steps hook steps, 0 = off: exponential decrease from
    # warmup_start_density to density (DGC: 25% -> 0.1% over 4 stages). method local: the first
    # warmup_steps steps sync after every step, densely (a dense allreduce of the change).
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    warmup_start_density: float = Field(0.25, gt=0.0, le=1.0)
    # exact: torch.topk on the whole bucket; sampled: threshold from the top-k of a ~1% sample,
    # then one pass (sent count within 10% of k, never above).
    selection: Literal["exact", "sampled"] = "sampled"
    # Per bucket, all-reduce densely (residual flushed into it) when the sparse allgather would send
    # at least as many bytes as the dense ring allreduce (about density >= 1 / N).
    dense_fallback: bool = True
    # Dtype of the values on the wire (indices stay int32). bfloat16: 6 bytes per pair instead of 8;
    # the rounding error stays in the residual when error_feedback is on.
    value_dtype: Literal["float32", "bfloat16"] = "float32"
    # PowerSGD: rank of the low-rank approximation (method powersgd only).
    powersgd_rank: int = Field(1, ge=1, le=64)
    # adam: each rank turns its OWN gradient into Adam's bias-corrected direction m / (sqrt(v) + eps)
    # with its own moments (kept in the hook, never sent), and top-k with error feedback compresses
    # that direction. The optimizer must then be plain SGD without momentum: see
    # workers/compression/DESIGN.md ("Preconditioned top-k") for the exact contract. Needs topk, error_feedback, momentum 0.
    precondition: Literal["none", "adam"] = "none"
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.95, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)

    @property
    def hook_owns_optimizer_state(self) -> bool:
        """The hook keeps the momentum (DGC momentum correction) or Adam's moments (precondition adam)
        and sends the update direction: the optimizer then only applies it, as SGD without momentum
        (with AdamW's decoupled weight decay, lr and schedule), and no global clip rescales it."""
        return self.method == "topk" and (self.momentum > 0 or self.precondition == "adam")

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        if self.momentum > 0 and (self.method != "topk" or not self.error_feedback):
            raise ValueError("momentum correction needs method 'topk' with error_feedback on "
                             "(with other methods use the optimizer's momentum)")
        if self.precondition == "adam" and (self.method != "topk" or not self.error_feedback or self.momentum > 0):
            raise ValueError("precondition 'adam' needs method 'topk' with error_feedback on and momentum 0 "
                             "(Adam's first moment is the momentum)")
        if self.method != "local":
            # Compared with the default, not by "was it set": a stored spec is dumped whole and read again.
            local_only = sorted(f for f in LOCAL_FIELDS if getattr(self, f) != type(self).model_fields[f].default)
            if local_only:
                raise ValueError(f"{', '.join(local_only)}: only for method 'local' (method is {self.method!r})")
        elif self.momentum > 0 or self.precondition != "none" or self.clip_norm is not None:
            raise ValueError("method 'local' keeps the optimizer (AdamW) on each worker: momentum, precondition "
                             "and clip_norm apply to method 'topk' only (use train.grad_clip)")
        if self.warmup_steps > 0 and self.method != "local" and self.warmup_start_density < self.density:
            raise ValueError(f"warmup_start_density ({self.warmup_start_density}) must be >= density "
                             f"({self.density}): the warm-up decreases the density")
        return self


class DataConfig(Config):
    # Folder of text or code files; None means the running Python's standard library source.
    source: str | None = None
    # Where the parquet shards go; None means a cache folder keyed by the source (docs/training.md,
    # "Your own data"). A folder or s3:// prefix prepared by `python -m jobs.prepare` (its
    # manifest.json) is read as is.
    path: str | None = Field(None, min_length=1, max_length=1024)
    # A prepared dataset's shard whose size or SHA-256 differs from its manifest: fail naming it,
    # or leave it out (logged) and train on the rest.
    on_corrupt: Literal["fail", "skip"] = "fail"
    extensions: tuple[str, ...] = Field(DEFAULT_EXTENSIONS, min_length=1, max_length=64)
    # Tokens per training sequence (the model sees seq_len inputs and seq_len targets).
    seq_len: int = Field(128, ge=8, le=131072)
    # Share of files held out for evaluation (chosen by a hash of the relative path).
    val_fraction: float = Field(0.02, ge=0.0, le=0.5)
    # Target size of one parquet shard in tokens (bytes): ~4 MiB shards stream in small blocks.
    shard_tokens: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1)
    # Cap on corpus size read from `source`, in bytes; None reads everything.
    max_bytes: int | None = Field(None, ge=1024)


class LoopConfig(Config):
    steps: int = Field(300, ge=1, le=10_000_000)
    # Sequences per worker per step.
    batch_size: int = Field(16, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0, le=1_000_000)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    grad_clip: float | None = Field(1.0, gt=0.0, le=1e6)
    log_every: int = Field(10, ge=1, le=1_000_000)
    checkpoint_every: int = Field(100, ge=1, le=10_000_000)
    # Checkpoints kept in storage (oldest deleted first).
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    # Held-out batches per worker for the final eval loss.
    eval_batches: int = Field(16, ge=0, le=100_000)
    # Threads torch may use inside one worker; 0 means cores / workers on the node.
    torch_threads: int = Field(1, ge=0, le=1024)
    # Forward precision (workers/device.py): fp32; bf16 autocast; fp16 autocast with dynamic loss
    # scaling (GradScaler). Master weights, gradients and optimizer state stay fp32 in all three.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # How the global batch (batch_size * workers sequences) is divided among the workers
    # (workers/balance.py). equal: batch_size each, from Ray Train's equal shards. speed: shares
    # follow each worker's measured throughput, so fast devices do not wait for slow ones; every
    # worker then streams the whole training set and takes its rows of each global batch.
    split: Literal["equal", "speed"] = "equal"
    # speed: steps between two throughput measurements, and the weight of a new measurement in the
    # smoothed throughput (1.0: the last measurement alone).
    split_every: int = Field(10, ge=1, le=1_000_000)
    split_smoothing: float = Field(0.5, gt=0.0, le=1.0)
