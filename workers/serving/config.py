"""Typed, bounded settings of one serving deployment, torch-free (jobs/specs/serve.py composes them
into the ServeSpec the control plane validates; ``ReplicaConfig`` is what each replica receives).

Only the SHA-256 of a deployment's bearer key ever reaches a replica or a spec: the key itself is
shown once to whoever deployed it (jobs/serve.py) and is not stored anywhere.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from workers.config import Config

# Hex SHA-256 of a bearer key: 64 lowercase hex digits.
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"


class BatchingConfig(Config):
    """Ray Serve's ``@serve.batch`` knobs for the generation batches of one replica."""

    # Rows (one per prompt and choice) generated together in one forward per token.
    max_batch_size: int = Field(16, ge=1, le=512)
    # How long the first row of a batch waits for others before the batch starts, in seconds,
    # where others are likely (another batch runs, or rows ended just before); a lone client's
    # request starts at once (workers/serving/app.py).
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0)
    # Batches a replica runs at once. A batch runs until its last row ends and rows arriving
    # meanwhile wait for a free batch slot, so 2 lets a new batch start beside a long one.
    max_concurrent_batches: int = Field(2, ge=1, le=64)
    # Memory for the keys and values of prompt prefixes kept for reuse by later requests that
    # start the same way (workers/serving/prefix.py), in MiB per replica; 0 turns reuse off.
    prefix_cache_mib: int = Field(64, ge=0, le=65536)


class AutoscalingSpec(Config):
    """Ray Serve's ``autoscaling_config`` (replicas follow the ongoing requests per replica)."""

    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(1, ge=1, le=1024)
    # Ongoing requests (rows waiting or generating) per replica that the autoscaler aims at.
    target_ongoing_requests: float = Field(8.0, gt=0.0, le=10_000.0)
    upscale_delay_s: float = Field(10.0, ge=0.0, le=3600.0)
    downscale_delay_s: float = Field(60.0, ge=0.0, le=3600.0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class LimitsConfig(Config):
    """What one request may ask for; beyond these it gets a 422 naming the field and the limit."""

    # Upper bound of a request's max_tokens (the model's context bounds prompt + max_tokens too).
    # Left unset, jobs/specs/serve.py (fit_limits) derives it and default_max_tokens from the checkpoint's context.
    max_tokens: int = Field(256, ge=1, le=131072)
    # max_tokens when a request does not say.
    default_max_tokens: int = Field(16, ge=1, le=131072)
    # Prompts per request times choices per prompt (n): the rows one request adds to batches.
    max_rows_per_request: int = Field(16, ge=1, le=512)
    max_stop_sequences: int = Field(4, ge=0, le=16)
    # Bytes of one request's body; a larger body is a 413 before it is parsed (prompts beyond the
    # model's context are a 422 before they are tokenized).
    max_body_bytes: int = Field(2**20, ge=2**10, le=2**26)

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self


class ChatTemplate(Config):
    """How /v1/chat/completions turns messages into the prompt text: each message is ``message``
    with ``{role}`` and ``{content}`` replaced (nothing else in it is special: no expressions are
    evaluated), then ``generation_prompt`` follows, where the model's answer starts. ``stop``: sequences
    that end an answer besides the request's own (the next turn's start). The default is a plain
    transcript, what a base model trained on documents can continue."""

    message: str = Field("{role}: {content}\n", min_length=1, max_length=1024)
    generation_prompt: str = Field("assistant:", max_length=1024)
    stop: tuple[str, ...] = Field(("\nuser:",), max_length=4)

    @model_validator(mode="after")
    def _check(self) -> ChatTemplate:
        if "{content}" not in self.message:
            raise ValueError("message must hold {content}")
        if any(not s or len(s) > 64 for s in self.stop):
            raise ValueError("stop sequences must hold 1 to 64 characters")
        return self


class ReplicaConfig(Config):
    """Everything one replica needs, passed as the deployment's init argument."""

    name: str = Field(min_length=1, max_length=64)  # the model id answered in /v1/models
    # A checkpoint folder (holding meta.json and model.pt) or its s3:// prefix (AWS_* from the replica's env).
    checkpoint: str = Field(min_length=1)
    key_sha256: str = Field(pattern=SHA256_HEX_PATTERN)
    # SHA-256 of the control plane's stats key: it may read /v1/stats only (the dashboard's figures).
    stats_key_sha256: str | None = Field(None, pattern=SHA256_HEX_PATTERN)
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    # Routed experts, attention and shared experts as per-channel int8 weights (workers/serving/int8.py).
    int8: bool = False
    # torch intra-op threads per replica; replicas share a node's cores.
    torch_threads: int = Field(1, ge=1, le=256)
    # The spec's chat template; None: the checkpoint's own (chat_template.json), else ChatTemplate().
    chat_template: ChatTemplate | None = None
