"""The Ray Serve deployment: a checkpoint answering OpenAI-compatible routes under its own prefix.

Routes (every one needs ``Authorization: Bearer <the deployment's key>``, else 401):
    POST /v1/completions   prompt(s) -> completions; ``stream: true`` sends server-sent events
                           ending in ``data: [DONE]``
    GET  /v1/models        the one model this deployment serves (its name)
    POST /v1/score         log-likelihood of a text, per token and in total
    GET  /v1/stats         this replica's batch-size histogram and time to first token

Batching: each row (one per prompt and choice) enters ``@serve.batch``, whose handler is an async
generator yielding one chunk per row per token. Ray Serve runs such a batch until its generator
ends, and rows that arrive meanwhile wait for one of ``max_concurrent_batches`` slots; so a row
that finishes leaves the running batch at once (the handler yields StopIteration for it and the
engine drops it from the KV cache) and its caller's stream closes, instead of holding on until the
longest row ends. Model steps run on one thread per replica, so concurrent batches interleave step
by step and the event loop stays free to accept requests.

Bounds before work: a body over ``limits.max_body_bytes`` is a 413 before any of it is parsed
(``BodyLimit``; a declared Content-Length at once, a chunked body once it passes the limit), and a
prompt longer in characters than the context could hold at the tokenizer's most bytes per token is
a 422 before it is tokenized; the exact token count is checked after.

Checkpoint and tokens: a replica loads its checkpoint from a folder or an ``s3://`` prefix (copied to
a temporary folder, loaded, deleted; local files are opened under the job's data roots,
ORCH_DATA_ROOTS in the replica's runtime_env, so a file linking outside them fails the deploy
naming it: workers/checkpoint.py), with the tokenizer stored in it (bytes or BPE): prompts,
context limits and usage count that tokenizer's tokens, and text streams out through each token's
bytes (workers/serving/tokens.py).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations through Serve's
# ingress wrapper, where string annotations do not resolve and a body would become a query field.
import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from workers.checkpoint import load_model, load_tokenizer_for
from workers.serving.config import ReplicaConfig
from workers.serving.engine import BatchGeneration, Chunk, RowRequest
from workers.serving.int8 import quantize_model
from workers.serving.schemas import (
    MAX_STOP_CHARS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    ReplicaStats,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from workers.serving.tokens import encode_prompt, max_token_bytes, token_pieces
from workers.storage import is_s3, local_copy
from workers.tokenizer import Tokenizer

log = logging.getLogger("ray.serve")
api = FastAPI(title="MoE completions", docs_url=None, redoc_url=None)
# Rows whose time to first token the stats keep (a sliding window).
TTFT_WINDOW_ROWS = 1000


class BodyLimit:
    """A request body over ``app.state.max_body_bytes`` (set by the replica) is answered 413 before
    any of it is parsed: a declared Content-Length over it at once, unread; else the body is read
    here up to the limit (a chunked body declares no length) and handed on, so at most the limit is
    held. Added before ``require_key``, so it runs after it: a caller without the key gets the 401."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            return await self._refuse(limit, scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await self._refuse(limit, scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(limit: int, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse({"detail": f"request body over this deployment's limit of {limit} bytes "
                                           "(limits.max_body_bytes)"}, status_code=413)
        await response(scope, receive, send)


api.add_middleware(BodyLimit)


@api.middleware("http")
async def require_key(request: Request, call_next: Any) -> Response:
    """Every route needs the deployment's bearer key, checked before the body is even parsed (a
    caller without the key learns nothing, not even which fields are wrong). Only the key's SHA-256
    is known here (``app.state.key_sha256``, set by the replica: one app object per replica process)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(key.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, request.app.state.key_sha256):
        return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


def unprocessable(loc: list[str | int], msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors: the field's location and the limit."""
    return HTTPException(422, detail=[{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def tokenize_prompt(tokenizer: Tokenizer, text: str, loc: list[str | int]) -> list[int]:
    """EOS (a document's start, as in training) then the text's tokens in the checkpoint's own
    tokenizer, so lengths, limits and usage count what the model sees; a 422 for empty or invalid text."""
    if not text:
        raise unprocessable(loc, "must not be empty")
    try:
        return encode_prompt(tokenizer, text)
    except UnicodeEncodeError as e:
        raise unprocessable(loc, f"is not valid UTF-8 (character {e.start}: {e.reason})") from None


async def merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """(row, chunk) from several row streams as they come."""
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:  # to its end (one step after the last chunk), so Serve's
                await queue.put((i, chunk))  # end-of-stream future is always awaited
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(tasks):
            i, item = await queue.get()
            if item is None:
                ended += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


@serve.deployment
@serve.ingress(api)
class CompletionServer:
    def __init__(self, config: dict[str, Any]):
        self.config = ReplicaConfig.model_validate(config)
        api.state.key_sha256 = self.config.key_sha256
        api.state.max_body_bytes = self.config.limits.max_body_bytes
        torch.set_num_threads(self.config.torch_threads)
        with local_copy(self.config.checkpoint) as folder:  # an s3:// checkpoint: a temporary copy
            also = (folder,) if is_s3(self.config.checkpoint) else ()  # the copy this replica made
            self.model = load_model(folder, also=also)
            self.tokenizer = load_tokenizer_for(folder, also=also)
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        self.pieces = token_pieces(self.tokenizer, self.model.config.vocab_size)
        self.int8_share = quantize_model(self.model).share if self.config.int8 else 0.0
        self.context = self.model.config.max_seq_len
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        b = self.config.batching
        self.batched = serve.batch(max_batch_size=b.max_batch_size, batch_wait_timeout_s=b.batch_wait_timeout_s,
                                   max_concurrent_batches=b.max_concurrent_batches)(self._run_batch)
        self.batch_sizes: Counter[int] = Counter()
        self.ttft_s: deque[float] = deque(maxlen=TTFT_WINDOW_ROWS)
        self.requests = self.rows = self.completion_tokens = 0
        log.info("serving %s from %s (%s tokenizer, int8 %s, share %.3f)", self.config.name, self.config.checkpoint,
                 self.tokenizer.kind, self.config.int8, self.int8_share)

    # -- batching ---------------------------------------------------------------------------------

    async def _run_batch(self, rows: list[RowRequest]) -> AsyncIterator[list[Chunk | type[StopIteration]]]:
        """The @serve.batch handler: one list per step, a chunk per running row, StopIteration for
        rows that finished in an earlier step."""
        self.batch_sizes[len(rows)] += 1
        gen = BatchGeneration(self.model, rows, self.pieces)
        loop = asyncio.get_running_loop()
        ended = [False] * len(rows)
        while not gen.done:
            chunks = await loop.run_in_executor(self.executor, gen.step)
            out: list[Chunk | type[StopIteration]] = []
            for i in range(len(rows)):
                chunk = chunks.get(i)
                out.append(StopIteration if ended[i] or chunk is None else chunk)
                if chunk is not None and chunk.finish_reason is not None:
                    ended[i] = True
                    self.completion_tokens += chunk.completion_tokens
            yield out
        self.ttft_s.extend(gen.first_token_s.values())

    # -- routes -----------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.name:
            raise HTTPException(404, detail=f"model {model!r} not found; this deployment serves {self.config.name!r}")

    def _rows(self, req: CompletionRequest) -> tuple[list[RowRequest], int]:
        """The rows a request asks for and its prompt tokens, or a 422 naming the field and limit."""
        limits = self.config.limits
        max_tokens = req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise unprocessable(["max_tokens"], f"{max_tokens} is above this deployment's limit of {limits.max_tokens}")
        prompts = req.prompts()
        if not prompts:
            raise unprocessable(["prompt"], "must hold at least one prompt")
        if len(prompts) * req.n > limits.max_rows_per_request:
            raise unprocessable(["n"], f"{len(prompts)} prompts x n={req.n} is above this deployment's limit of "
                                       f"{limits.max_rows_per_request} completions per request")
        stops = req.stops()
        if len(stops) > limits.max_stop_sequences or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise unprocessable(["stop"], f"at most {limits.max_stop_sequences} sequences of at most "
                                          f"{MAX_STOP_CHARS} characters")
        locs: list[list[str | int]] = [["prompt"] if isinstance(req.prompt, str) else ["prompt", p]
                                       for p in range(len(prompts))]
        for text, loc in zip(prompts, locs, strict=True):  # every prompt, before any is tokenized
            self._check_length(text, self.context - 1 - max_tokens, loc, f"left by max_tokens {max_tokens} in")
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        rows, prompt_tokens = [], 0
        for text, loc in zip(prompts, locs, strict=True):
            tokens = tokenize_prompt(self.tokenizer, text, loc)
            if len(tokens) + max_tokens > self.context:
                raise unprocessable(loc, f"{len(tokens)} prompt tokens + max_tokens {max_tokens} exceed the "
                                         f"model's context of {self.context} tokens")
            prompt_tokens += len(tokens)
            rows += [RowRequest(tuple(tokens), max_tokens, req.temperature, req.top_p, stops, seed + j)
                     for j in range(req.n)]
        return rows, prompt_tokens

    def _check_length(self, text: str, budget: int, loc: list[str | int], where: str) -> None:
        """A 422 for a text too long to fit ``budget`` tokens (after the EOS that starts it) whatever
        it encodes to: more characters than ``budget`` tokens of the tokenizer's longest can hold.
        Cheap (a length), so an over-long text is refused before it is tokenized."""
        if len(text) > budget * self.max_token_bytes:
            raise unprocessable(loc, f"{len(text)} characters cannot fit the {budget} tokens {where} the model's "
                                     f"context of {self.context} tokens (at most {self.max_token_bytes} bytes "
                                     "per token)")

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.name, created=self.created)])

    @api.post("/v1/completions", response_model=None)
    async def completions(self, req: CompletionRequest) -> Completion | StreamingResponse:
        self._check_model(req.model)
        rows, prompt_tokens = self._rows(req)
        self.requests += 1
        self.rows += len(rows)
        streams = [self.batched(row) for row in rows]  # every row is queued now, together
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._events(streams, head, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        texts, finish, used = [""] * len(rows), [None] * len(rows), [0] * len(rows)
        async for i, chunk in merge(streams):
            texts[i] += chunk.text
            finish[i], used[i] = chunk.finish_reason, chunk.completion_tokens
        choices = [CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(used), total_tokens=prompt_tokens + sum(used))
        return Completion(**head, choices=choices, usage=usage)

    async def _events(self, streams: list[AsyncIterator[Chunk]], head: dict[str, Any], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        used = 0
        async for i, chunk in merge(streams):
            choice = CompletionChoice(index=i, text=chunk.text, finish_reason=chunk.finish_reason)
            yield f"data: {Completion(**head, choices=[choice]).model_dump_json()}\n\n"
            if chunk.finish_reason is not None:
                used += chunk.completion_tokens
        if include_usage:
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used)
            yield f"data: {Completion(**head, choices=[], usage=usage).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    @api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_model(req.model)
        self._check_length(req.text, self.context - 1, ["text"], "left in")
        tokens = tokenize_prompt(self.tokenizer, req.text, ["text"])
        if len(tokens) > self.context:
            raise unprocessable(["text"], f"{len(tokens)} tokens exceed the model's context of {self.context} tokens")
        logprobs = await asyncio.get_running_loop().run_in_executor(self.executor, self._logprobs, tokens)
        return ScoreResponse(model=self.config.name, tokens=tokens[1:], logprobs=logprobs,
                             total_logprob=sum(logprobs), n_tokens=len(logprobs))

    @torch.no_grad()
    def _logprobs(self, tokens: list[int]) -> list[float]:
        idx_1L = torch.tensor([tokens])  # (1, L)
        logp_LV = torch.log_softmax(self.model(idx_1L)[0, :-1].float(), dim=-1)  # (L - 1, V)
        return logp_LV.gather(1, idx_1L[0, 1:, None])[:, 0].tolist()

    @api.get("/v1/stats", response_model=ReplicaStats)
    async def stats(self) -> ReplicaStats:
        ttft = sorted(self.ttft_s)
        pct = (lambda q: round(1000 * ttft[min(len(ttft) - 1, int(q * len(ttft)))], 2)) if ttft else (lambda q: None)
        return ReplicaStats(
            replica=serve.get_replica_context().replica_id.unique_id, checkpoint=self.config.checkpoint,
            int8=self.config.int8, requests=self.requests, rows=self.rows,
            completion_tokens=self.completion_tokens, batch_sizes=dict(sorted(self.batch_sizes.items())),
            ttft_ms_p50=pct(0.5), ttft_ms_p90=pct(0.9))
