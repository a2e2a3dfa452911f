"""The Ray Serve deployment: a checkpoint answering OpenAI-compatible routes under its own prefix.

Routes (every one needs ``Authorization: Bearer <the deployment's key>``, else 401):
    POST /v1/completions       prompt(s) -> completions; ``stream: true`` sends server-sent events
                               ending in ``data: [DONE]``; ``logprobs: k``; ``echo`` (with
                               ``max_tokens: 0``: the prompt scored, nothing generated)
    POST /v1/chat/completions  messages -> answers, through the deployment's chat template
                               (workers/serving/chat.py); ``logprobs`` + ``top_logprobs``, streaming
    GET  /v1/models            the one model this deployment serves (its name)
    POST /v1/score             log-likelihood of a text, per token and in total
    GET  /v1/stats             this replica's latency, batch and load figures (workers/serving/stats.py);
                               also answers the control plane's stats key (``stats_key_sha256``)

Batching: each row (one per prompt and choice) enters ``@serve.batch``, whose handler is an async
generator yielding one chunk per row per token. Ray Serve runs such a batch until its generator
ends, and rows that arrive meanwhile wait for one of ``max_concurrent_batches`` slots; so a row
that finishes leaves the running batch at once (the handler yields StopIteration for it and the
engine drops it from the KV cache) and its caller's stream closes, instead of holding on until the
longest row ends. A caller that goes away (a dropped stream: Serve cancels its request) marks its
rows cancelled, and they leave at the next step. Model steps run on one thread per replica, each
batch's next step queued as soon as its last ends (``_pump``), so concurrent batches interleave step
by step and the event loop stays free to accept requests and hand tokens on meanwhile.

Bounds before work: a body over ``limits.max_body_bytes`` is a 413 before any of it is parsed
(workers/serving/http.py), and a prompt longer in characters than the context could hold at the
tokenizer's most bytes per token is a 422 before it is tokenized; the exact token count is checked
after. Any other bad body (a wrong type, NaN, a lone surrogate) is a 422 naming the field.

Checkpoint and tokens: a replica loads its checkpoint from a folder or an ``s3://`` prefix (copied to
a temporary folder, loaded, deleted; local files are opened under the job's data roots,
ORCH_DATA_ROOTS in the replica's runtime_env, so a file linking outside them fails the deploy
naming it: workers/checkpoint.py), with the tokenizer stored in it (bytes or BPE): prompts,
context limits and usage count that tokenizer's tokens, and text streams out through each token's
bytes (workers/serving/tokens.py). Latency and load go to Ray's metrics (workers/serving/metrics.py).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations through Serve's
# ingress wrapper, where string annotations do not resolve and a body would become a query field.
import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from ray import serve

from workers.checkpoint import load_model, load_tokenizer_for
from workers.data.storage import is_s3, local_copy
from workers.data.tokenizer import Tokenizer
from workers.serving import chat
from workers.serving.config import ChatTemplate, ReplicaConfig
from workers.serving.engine import BatchGeneration, Chunk, RowRequest, Rows, prompt_logprobs
from workers.serving.http import EXCEPTION_HANDLERS, BodyLimit, RequireKey, merge, unprocessable
from workers.serving.int8 import quantize_model
from workers.serving.logprobs import chat_logprobs, completion_logprobs
from workers.serving.metrics import ServingMetrics
from workers.serving.prefix import PrefixCache
from workers.serving.schemas import (
    MAX_STOP_CHARS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    ReplicaStats,
    Sampling,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from workers.serving.stats import ReplicaFigures
from workers.serving.tokens import encode_prompt, max_token_bytes, token_pieces

log = logging.getLogger("ray.serve")
api = FastAPI(title="MoE completions", docs_url=None, redoc_url=None, exception_handlers=EXCEPTION_HANDLERS)
api.add_middleware(BodyLimit)
api.add_middleware(RequireKey)  # added last: it runs first
SSE = "text/event-stream"
# After two requests were in flight at once, batches wait for company this long (concurrent clients).
COMPANY_WINDOW_S = 1.0
# Answers besides 200 and 422 (documented, so clients and the schema tests know them).
ERRORS: dict[int | str, dict[str, Any]] = {401: {"description": "missing or wrong key"},
                                           413: {"description": "body over limits.max_body_bytes"}}
MODEL_ERRORS = {**ERRORS, 400: {"description": "the body cannot be parsed (not UTF-8, or nested too deep)"},
                404: {"description": "model names another deployment"}}
# A server-sent event as the document describes one (the schema of a text/event-stream body is each
# event's, OpenAPI 3.2's reading): its data is a JSON chunk, or "[DONE]" last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
STREAMS = {**MODEL_ERRORS, 200: {"description": "the answer; server-sent events with stream: true",
                                 "content": {SSE: {"schema": SSE_EVENT}}}}


def tokenize_prompt(tokenizer: Tokenizer, text: str, loc: list[str | int]) -> list[int]:
    """EOS (a document's start, as in training) then the text's tokens in the checkpoint's own
    tokenizer, so lengths, limits and usage count what the model sees; a 422 for empty or invalid text."""
    if not text:
        raise unprocessable(loc, "must not be empty")
    try:
        return encode_prompt(tokenizer, text)
    except UnicodeEncodeError as e:
        raise unprocessable(loc, f"is not valid UTF-8 (character {e.start}: {e.reason})") from None


def _sse(body: Any) -> str:
    return f"data: {body.model_dump_json()}\n\n"


@serve.deployment
@serve.ingress(api)
class CompletionServer:
    def __init__(self, config: dict[str, Any]):
        self.config = ReplicaConfig.model_validate(config)
        api.state.key_sha256 = self.config.key_sha256
        api.state.max_body_bytes = self.config.limits.max_body_bytes
        api.state.stats_key_sha256 = self.config.stats_key_sha256
        api.state.figures = self.figures = ReplicaFigures(ServingMetrics(self.config.name))
        torch.set_num_threads(self.config.torch_threads)
        with local_copy(self.config.checkpoint) as folder:  # an s3:// checkpoint: a temporary copy
            also = (folder,) if is_s3(self.config.checkpoint) else ()  # the copy this replica made
            self.model = load_model(folder, also=also)
            self.tokenizer = load_tokenizer_for(folder, also=also)
            self.template = self.config.chat_template or chat.checkpoint_template(folder, also) or ChatTemplate()
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        self.pieces = token_pieces(self.tokenizer, self.model.config.vocab_size)
        self.int8_share = quantize_model(self.model).share if self.config.int8 else 0.0
        self.context = self.model.config.max_seq_len
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        b = self.config.batching
        self.batched = serve.batch(max_batch_size=b.max_batch_size, batch_wait_timeout_s=b.batch_wait_timeout_s,
                                   max_concurrent_batches=b.max_concurrent_batches)(self._run_batch)
        self.prefixes = PrefixCache(b.prefix_cache_mib * 2**20) if b.prefix_cache_mib else None
        self.running: set[BatchGeneration] = set()
        self.in_flight = 0  # requests generating or queued for a batch
        self.concurrent_until = 0.0  # until when another request's company is likely (perf_counter s)
        log.info("serving %s from %s (%s tokenizer, int8 %s, share %.3f)", self.config.name, self.config.checkpoint,
                 self.tokenizer.kind, self.config.int8, self.int8_share)

    # -- batching ---------------------------------------------------------------------------------

    async def _run_batch(self, rows: list[RowRequest]) -> AsyncIterator[list[Chunk | type[StopIteration]]]:
        """The @serve.batch handler: one list per step, a chunk per running row, StopIteration for
        rows that finished in an earlier step or were cancelled."""
        start = time.perf_counter()
        self.figures.batch_started([start - row.enqueued_s for row in rows])
        gen = BatchGeneration(self.model, rows, self.pieces, self.prefixes)
        self.running.add(gen)
        steps: asyncio.Queue[dict[int, Chunk] | BaseException | None] = asyncio.Queue()
        self.executor.submit(self._pump, gen, asyncio.get_running_loop(), steps)
        ended = [False] * len(rows)
        first_at = [0.0] * len(rows)
        try:
            while (chunks := await steps.get()) is not None:
                if isinstance(chunks, BaseException):
                    raise chunks
                now = time.perf_counter()
                self.figures.generated(len(chunks))
                out: list[Chunk | type[StopIteration]] = []
                for i, row in enumerate(rows):
                    chunk = chunks.get(i)
                    out.append(StopIteration if ended[i] or chunk is None else chunk)
                    if chunk is None:
                        continue
                    if chunk.completion_tokens == 1:
                        first_at[i] = now
                        self.figures.first_token(now - row.enqueued_s)
                    if chunk.finish_reason is not None:
                        ended[i] = True
                        self.figures.finished(chunk.completion_tokens, now - first_at[i])
                yield out
        finally:
            self.running.discard(gen)
            if not gen.done:  # left early (the batch was cancelled): its rows stop at the next step
                for row in rows:
                    row.cancelled.set()

    def _pump(self, gen: BatchGeneration, loop: asyncio.AbstractEventLoop, steps: asyncio.Queue) -> None:
        """One step of ``gen`` on the model thread, handed to the batch's queue; then its next step
        is queued behind whatever else waits for the model (other batches' steps, a score), so
        concurrent batches still interleave step by step but the model never idles while the event
        loop hands a step's tokens on (that round trip per token was part of Serve's added latency)."""
        try:
            chunks = gen.step()
        except BaseException as e:  # handed to the batch, which raises it in its callers
            loop.call_soon_threadsafe(steps.put_nowait, e)
            return
        loop.call_soon_threadsafe(steps.put_nowait, chunks)
        if gen.done:
            loop.call_soon_threadsafe(steps.put_nowait, None)
        else:
            self.executor.submit(self._pump, gen, loop, steps)

    async def _generate(self, rows: list[RowRequest]) -> AsyncIterator[tuple[int, Chunk]]:
        """(row, chunk) as the rows generate; rows still running when this ends (its caller went
        away: Serve cancels a dropped request) are cancelled, so they leave their batch.

        The batch waits ``batch_wait_timeout_s`` for company only where company is likely: while
        another batch runs or another request is in flight, or was within ``COMPANY_WINDOW_S``
        (concurrent clients come back together). A lone client's requests start at once; each used
        to pay the whole wait before its first token (part of Serve's added latency)."""
        now = time.perf_counter()
        if self.in_flight:
            self.concurrent_until = now + COMPANY_WINDOW_S
        company = bool(self.running) or now < self.concurrent_until
        self.batched.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s if company else 0.0)
        self.in_flight += 1
        try:
            async for item in merge([self.batched(row) for row in rows]):  # queued now, together
                yield item
        finally:
            self.in_flight -= 1
            for row in rows:
                row.cancelled.set()

    # -- routes -----------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.name:
            raise HTTPException(404, detail=f"model {model!r} not found; this deployment serves {self.config.name!r}")

    def _rows(self, req: Sampling, texts: list[tuple[str, list[str | int]]], max_tokens: int | None,
              max_loc: str, logprobs: int | None = None, stops: tuple[str, ...] = ()) -> Rows:
        """The rows a request asks for (``n`` per prompt text, each with its body location), or a
        422 naming the field and limit."""
        self._check_model(req.model)
        limits = self.config.limits
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > limits.max_tokens:
            raise unprocessable([max_loc], f"{max_tokens} is above this deployment's limit of {limits.max_tokens}")
        if len(texts) * req.n > limits.max_rows_per_request:
            raise unprocessable(["n"], f"{len(texts)} prompts x n={req.n} is above this deployment's limit of "
                                       f"{limits.max_rows_per_request} completions per request")
        own = req.stops()
        if len(own) > limits.max_stop_sequences or any(len(s) > MAX_STOP_CHARS for s in own):
            raise unprocessable(["stop"], f"at most {limits.max_stop_sequences} sequences of at most "
                                          f"{MAX_STOP_CHARS} characters")
        for text, loc in texts:  # every prompt, before any is tokenized
            self._check_length(text, self.context - 1 - max_tokens, loc, f"left by {max_loc} {max_tokens} in")
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        rows, prompts = [], []
        for text, loc in texts:
            tokens = tokenize_prompt(self.tokenizer, text, loc)
            if len(tokens) + max_tokens > self.context:
                raise unprocessable(loc, f"{len(tokens)} prompt tokens + {max_loc} {max_tokens} exceed the "
                                         f"model's context of {self.context} tokens")
            prompts.append(tokens)
            rows += [RowRequest(tuple(tokens), max_tokens, req.temperature, req.top_p, own + stops, seed + j,
                                logprobs) for j in range(req.n)]
        self.figures.accepted(len(rows), sum(len(p) for p in prompts))
        return Rows(rows, prompts)

    def _check_length(self, text: str, budget: int, loc: list[str | int], where: str) -> None:
        """A 422 for a text too long to fit ``budget`` tokens (after the EOS that starts it) whatever
        it encodes to: more characters than ``budget`` tokens of the tokenizer's longest can hold.
        Cheap (a length), so an over-long text is refused before it is tokenized."""
        if len(text) > budget * self.max_token_bytes:
            raise unprocessable(loc, f"{len(text)} characters cannot fit the {budget} tokens {where} the model's "
                                     f"context of {self.context} tokens (at most {self.max_token_bytes} bytes "
                                     "per token)")

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.name, created=self.created)])

    @api.post("/v1/completions", response_model=None, responses=STREAMS)
    async def completions(self, req: CompletionRequest) -> Completion | StreamingResponse:
        if req.max_tokens == 0 and not req.echo:
            raise unprocessable(["max_tokens"], "must be greater than or equal to 1 (0 only with echo: true, "
                                                "to score the prompt)")
        if req.echo and req.stream:
            raise unprocessable(["echo"], "is not supported with stream: true")
        prompts = req.prompts()
        if not prompts:
            raise unprocessable(["prompt"], "must hold at least one prompt")
        locs: list[list[str | int]] = [["prompt"] if isinstance(req.prompt, str) else ["prompt", p]
                                       for p in range(len(prompts))]
        batch = self._rows(req, list(zip(prompts, locs, strict=True)), req.max_tokens, "max_tokens", req.logprobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.name}
        if req.stream:
            return StreamingResponse(self._completion_events(batch, head, req), media_type=SSE)
        if batch.rows[0].max_tokens > 0:
            async for i, chunk in self._generate(batch.rows):
                batch.add(i, chunk)
        echoed = [await self._echo(tokens, req.logprobs) for tokens in batch.prompts] if req.echo else None
        choices = []
        for i, row in enumerate(batch.rows):
            p = i // req.n
            text = (prompts[p] if req.echo else "") + batch.texts[i]
            logprobs = None
            if req.logprobs is not None:
                scored = ([*echoed[p]] if echoed else []) + (batch.scored[i] if row.max_tokens else [])
                logprobs = completion_logprobs(self.pieces, scored, with_top=req.logprobs > 0)
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                            finish_reason=batch.finish[i] or "length"))
        return Completion(**head, choices=choices, usage=Usage.of(batch.prompt_tokens, sum(batch.used)))

    async def _echo(self, tokens: list[int], k: int | None) -> list[tuple[int, float | None, tuple]]:
        """An echoed prompt's tokens (after its EOS) with their scores when ``logprobs`` asks."""
        if k is None:
            return [(t, None, ()) for t in tokens[1:]]
        scores = await asyncio.get_running_loop().run_in_executor(self.executor, prompt_logprobs, self.model,
                                                                  tokens, k)
        return [(t, lp, top) for t, (lp, top) in zip(tokens[1:], scores, strict=True)]

    async def _completion_events(self, batch: Rows, head: dict[str, Any], req: CompletionRequest
                                 ) -> AsyncIterator[str]:
        offsets = [0] * len(batch.rows)
        async for i, chunk in self._generate(batch.rows):
            batch.add(i, chunk)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(self.pieces, [batch.scored[i][-1]], offsets[i], req.logprobs > 0)
                offsets[i] = len(batch.texts[i])
            choice = CompletionChoice(index=i, text=chunk.text, logprobs=logprobs, finish_reason=chunk.finish_reason)
            yield _sse(Completion(**head, choices=[choice]))
        if req.include_usage:
            yield _sse(Completion(**head, choices=[], usage=Usage.of(batch.prompt_tokens, sum(batch.used))))
        yield "data: [DONE]\n\n"

    @api.post("/v1/chat/completions", response_model=None, responses=STREAMS)
    async def chat_completions(self, req: chat.ChatCompletionRequest) -> chat.ChatCompletion | StreamingResponse:
        if req.top_logprobs is not None and not req.logprobs:
            raise unprocessable(["top_logprobs"], "needs logprobs: true")
        k = (req.top_logprobs or 0) if req.logprobs else None
        loc = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        batch = self._rows(req, [(chat.render(self.template, req.messages), ["messages"])], req.limit, loc, k,
                           self.template.stop)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.name}
        if req.stream:
            return StreamingResponse(self._chat_events(batch, head, req), media_type=SSE)
        async for i, chunk in self._generate(batch.rows):
            batch.add(i, chunk)
        choices = [chat.ChatChoice(index=i, message=chat.AssistantMessage(content=batch.texts[i]),
                                   finish_reason=batch.finish[i] or "length",
                                   logprobs=chat_logprobs(self.pieces, batch.scored[i]) if k is not None else None)
                   for i in range(len(batch.rows))]
        return chat.ChatCompletion(**head, choices=choices, usage=Usage.of(batch.prompt_tokens, sum(batch.used)))

    async def _chat_events(self, batch: Rows, head: dict[str, Any], req: chat.ChatCompletionRequest
                           ) -> AsyncIterator[str]:
        yield _sse(chat.ChatCompletionChunk(**head, choices=[
            chat.ChunkChoice(index=i, delta=chat.Delta(role="assistant", content="")) for i in range(len(batch.rows))]))
        async for i, chunk in self._generate(batch.rows):
            batch.add(i, chunk)
            logprobs = chat_logprobs(self.pieces, [batch.scored[i][-1]]) if req.logprobs else None
            choice = chat.ChunkChoice(index=i, delta=chat.Delta(content=chunk.text), logprobs=logprobs,
                                      finish_reason=chunk.finish_reason)
            yield _sse(chat.ChatCompletionChunk(**head, choices=[choice]))
        if req.include_usage:
            yield _sse(chat.ChatCompletionChunk(**head, choices=[], usage=Usage.of(batch.prompt_tokens, sum(batch.used))))
        yield "data: [DONE]\n\n"

    @api.post("/v1/score", response_model=ScoreResponse, responses=MODEL_ERRORS)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_model(req.model)
        self._check_length(req.text, self.context - 1, ["text"], "left in")
        tokens = tokenize_prompt(self.tokenizer, req.text, ["text"])
        if len(tokens) > self.context:
            raise unprocessable(["text"], f"{len(tokens)} tokens exceed the model's context of {self.context} tokens")
        scores = await asyncio.get_running_loop().run_in_executor(self.executor, prompt_logprobs, self.model,
                                                                  tokens, 0)
        logprobs = [lp for lp, _ in scores]
        return ScoreResponse(model=self.config.name, tokens=tokens[1:], logprobs=logprobs,
                             total_logprob=sum(logprobs), n_tokens=len(logprobs))

    @api.get("/v1/stats", response_model=ReplicaStats, responses=ERRORS)
    async def stats(self) -> ReplicaStats:
        return ReplicaStats(
            replica=serve.get_replica_context().replica_id.unique_id, checkpoint=self.config.checkpoint,
            int8=self.config.int8, running_rows=sum(len(g.running) for g in self.running),
            prefix_hit_tokens=self.prefixes.hit_tokens if self.prefixes is not None else 0, **self.figures.snapshot())
