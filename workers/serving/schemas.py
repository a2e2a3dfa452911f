"""Request and response bodies of the OpenAI-compatible completions route (the subset this model
serves), plus /v1/score; the chat route's are in workers/serving/chat.py. Bounds that do not
depend on the deployment live here; the deployment's own limits (max_tokens, rows per request, the
model's context) are checked in app.py with the same 422 shape.

Every request body derives from ``Body``: a NaN or infinite number (Python's JSON parser reads the
``NaN`` and ``Infinity`` tokens) and a string holding a lone surrogate (a ``"\\ud800"`` escape,
which no UTF-8 encoder writes) are 422s naming the field, where they used to reach the handlers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Stop sequences are matched on text; longer ones could never be held back cheaply.
MAX_STOP_CHARS = 64
# Stop sequences in one list, before the deployment's own (smaller) limit is checked.
MAX_STOP_LIST = 64
# Prompts in one list: a request's rows are bounded by limits.max_rows_per_request anyway, this
# bounds the work before that check (a 1 MiB body holds some 300,000 empty strings).
MAX_PROMPTS = 512
# Most likely alternatives per token a request may ask for (OpenAI's bound for completions is 5,
# for chat 20; both routes take 20).
MAX_TOP_LOGPROBS = 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(value: Any) -> Any:
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
            where = f"item {i} " if isinstance(value, list) else ""
            raise ValueError(f"{where}is not valid UTF-8: it holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape)")
    return value


class Body(BaseModel):
    # Unknown OpenAI fields (logit_bias, user, ...) are accepted and ignored, as clients send them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _no_surrogates(value)


class StreamOptions(Body):
    include_usage: bool = False  # a last event with ``usage`` and no choices (OpenAI's convention)


class Sampling(Body):
    """What the completions and chat routes share."""

    model: str | None = Field(None, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_LIST)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
    # 0 only with ``echo``: the prompt scored, nothing generated (app.py says so otherwise).
    max_tokens: int | None = Field(None, ge=0)
    # The prompt's text (and with ``logprobs`` its tokens' log-probabilities) before the completion.
    echo: bool = False
    # Log-probabilities of the sampled tokens and of the ``logprobs`` most likely ones at each step.
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionLogprobs(BaseModel):
    """OpenAI's completions ``logprobs``: per token its text (``bytes:\\xNN`` for bytes that are
    not UTF-8 on their own), natural-log probability, the most likely alternatives, and offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


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


class ScoreRequest(Body):
    model: str | None = Field(None, max_length=256)
    text: str


class ScoreResponse(BaseModel):
    """Log-likelihood of ``text`` as the start of a document: log p(token | the tokens before it),
    natural log, one per token (the first conditioned on the end-of-document token)."""

    model: str
    tokens: list[int]
    logprobs: list[float]
    total_logprob: float
    n_tokens: int


class ReplicaStats(BaseModel):
    """What one replica has seen (the replica that answers is one of several): counts since it
    started, latencies over its latest rows, rates over the last minute (workers/serving/stats.py)."""

    replica: str
    checkpoint: str
    int8: bool
    requests: int
    rows: int
    completion_tokens: int  # of rows that finished
    tokens_generated: int  # every token generated, rows cancelled by a dropped client included
    running_rows: int  # rows in this replica's batches now
    prefix_hit_tokens: int  # prompt tokens whose prefill reused a cached prefix (batching.prefix_cache_mib)
    batch_sizes: dict[int, int]  # rows in a batch -> batches of that size
    mean_batch_rows: float | None
    ttft_ms_p50: float | None  # from enqueue to the row's first token
    ttft_ms_p95: float | None
    tpot_ms_p50: float | None  # a finished row's time per output token after its first
    tpot_ms_p95: float | None
    queue_wait_ms_p50: float | None  # from enqueue to its batch's start
    queue_wait_ms_p95: float | None
    prompt_tokens_per_s: float  # over the last minute
    completion_tokens_per_s: float
    requests_by_status: dict[str, int]  # HTTP status -> answers since the replica started
