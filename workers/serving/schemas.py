"""Request and response bodies of the OpenAI-compatible routes (the subset this model serves),
plus /v1/score. Bounds that do not depend on the deployment live here; the deployment's own limits
(max_tokens, rows per request, the model's context) are checked in app.py with the same 422 shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Stop sequences are matched on text; longer ones could never be held back cheaply.
MAX_STOP_CHARS = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # a last event with ``usage`` and no choices (OpenAI's convention)


class CompletionRequest(BaseModel):
    # Unknown OpenAI fields (logit_bias, user, ...) are accepted and ignored, as clients send them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-orchestrator"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text: str


class ScoreResponse(BaseModel):
    """Log-likelihood of ``text`` as the start of a document: log p(token | the tokens before it),
    natural log, one per UTF-8 byte (the first conditioned on the end-of-document token)."""

    model: str
    tokens: list[int]
    logprobs: list[float]
    total_logprob: float
    n_tokens: int


class ReplicaStats(BaseModel):
    """What one replica has seen since it started (the replica that answers is one of several)."""

    replica: str
    checkpoint: str
    int8: bool
    requests: int
    rows: int
    completion_tokens: int
    batch_sizes: dict[int, int]  # rows in a batch -> batches of that size
    ttft_ms_p50: float | None  # from enqueue to the row's first token, over the last rows
    ttft_ms_p90: float | None
