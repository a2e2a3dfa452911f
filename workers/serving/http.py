"""The serving app's HTTP edges, before and after its routes: the key check, the body limit, the
one renderer of 422s, and merging row streams.

Why plain ASGI middleware (not ``@app.middleware("http")``): Starlette's ``BaseHTTPMiddleware`` runs
the route in a task of its own and relays every message of the response through a memory stream,
which cost each streamed token an extra task switch (part of Serve's added latency,
tests/bench/serving.py); these pass the messages straight through.

Why a renderer of its own: FastAPI's echoes each error's input, and the input of a refused NaN
(``"temperature": NaN``, which Python's JSON parser reads) or of a lone surrogate cannot be encoded
back, so the 422 became a 500. Here an error is its location, message and type only, at most
``MAX_REPORTED_ERRORS`` of them (a 1 MiB list of wrong values would list a few hundred thousand),
written as ASCII JSON so no character can fail to encode.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations.
import asyncio
import hashlib
import hmac
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.serving.engine import Chunk

MAX_REPORTED_ERRORS = 20


class AsciiJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _safe(part: Any) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    if isinstance(part, float) and not math.isfinite(part):
        return str(part)
    return str(part).encode("utf-8", "replace").decode("utf-8")


async def validation_error_response(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": [_safe(p) for p in e.get("loc", ())], "msg": _safe(e.get("msg", "")),
               "type": _safe(e.get("type", "value_error"))} for e in exc.errors()[:MAX_REPORTED_ERRORS]]
    return AsciiJSON({"detail": errors}, status_code=422)


async def http_error_response(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own answer, but a JSON body that is not UTF-8 (a bare 400 from FastAPI) is the 422
    ``json_invalid`` any other undecodable body gets, located at its first bad byte."""
    e = exc.__cause__
    if exc.status_code == 400 and isinstance(e, UnicodeDecodeError):
        return AsciiJSON({"detail": [{"loc": ["body", e.start], "type": "json_invalid",
                                      "msg": f"JSON decode error: invalid UTF-8 byte 0x{e.object[e.start]:02x}"}]},
                         status_code=422)
    return await http_exception_handler(request, exc)


# The serving app's handlers (workers/serving/app.py): every error a client's body can cause is a 422.
EXCEPTION_HANDLERS = {RequestValidationError: validation_error_response, StarletteHTTPException: http_error_response}


def unprocessable(loc: list[str | int], msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors: the field's location and the limit."""
    return HTTPException(422, detail=[{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


class RequireKey:
    """Every route needs the deployment's bearer key, checked before the body is even parsed (a
    caller without the key learns nothing, not even which fields are wrong). Only the key's SHA-256
    is known here (``app.state.key_sha256``, set by the replica: one app object per replica process).
    ``/v1/stats`` also takes the control plane's stats key (``app.state.stats_key_sha256``), which
    reads those figures and nothing else. Every answer is counted by route and status
    (``app.state.figures``, workers/serving/stats.py)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        stats_key = state.stats_key_sha256 if scope["path"].endswith("/v1/stats") else None
        allowed = scheme.lower() == "bearer" and (hmac.compare_digest(digest, state.key_sha256) or (
            stats_key is not None and hmac.compare_digest(digest, stats_key)))
        status = 500  # a route that raised before answering

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if allowed:
                await self.app(scope, receive, counted)
            else:
                await JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer <key>)"},
                                   status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted)
        finally:
            state.figures.answered(getattr(scope.get("route"), "path", "other"), status)


class BodyLimit:
    """A request body over ``app.state.max_body_bytes`` (set by the replica) is answered 413 before
    any of it is parsed: a declared Content-Length over it at once, unread; else the body is read
    here up to the limit (a chunked body declares no length) and handed on, so at most the limit is
    held. Runs after ``RequireKey``: a caller without the key gets the 401."""

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
