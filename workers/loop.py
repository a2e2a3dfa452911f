"""Per-worker training loop under Ray Train."""

from __future__ import annotations

from pydantic import Field

from workers.config import Config


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
    # Threads torch may use inside one worker; 0 means cores / workers.
    torch_threads: int = Field(1, ge=0, le=1024)
