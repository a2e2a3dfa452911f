"""Top-k gradient sparsification with error feedback, as a DDP communication hook."""

from typing import Literal

from pydantic import Field

from workers.config import Config


class CompressionConfig(Config):
    # none: dense allreduce (still byte-counted); topk: sparse (index, value) allgather.
    method: Literal["none", "topk"] = "topk"
    # Fraction of each bucket's elements sent per step.
    density: float = Field(0.01, gt=0.0, le=1.0)
    # Keep what was not sent and add it to the next step's gradient (Stich et al. 2018).
    error_feedback: bool = True
