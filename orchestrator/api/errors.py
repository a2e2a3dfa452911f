"""Client input made safe to store and to echo: any request gets a 422 naming the field, never a 500.

Python's json module decodes two kinds of value that no JSON encoder writes back: lone UTF-16
surrogates (a ``"\\udfff"`` escape becomes a str that UTF-8 cannot encode) and the ``NaN``,
``Infinity`` and ``-Infinity`` tokens (and literals such as ``1e999`` that overflow to infinity).
FastAPI's own 422 handler echoes each error's input and crashed on them, as did a response carrying
one back. So ``unencodable`` finds them in a request body (``JobCreate`` rejects them, located), and
``validation_error_response`` is the one formatter of every request validation error: locations,
messages, inputs and contexts go through ``json_safe``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# Errors listed per 422: a 1 MiB body of NaN tokens would otherwise list some 200,000.
MAX_REPORTED_ERRORS = 50
# Nesting levels of an echoed input or context; a deeper one is left out of its error.
MAX_ECHO_DEPTH = 32

Location = tuple[str | int, ...]
_SURROGATE = re.compile("[\ud800-\udfff]")


class TooDeep(ValueError):
    """A value nested deeper than ``json_safe`` copies."""


def has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def scrub(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, so that it encodes as UTF-8."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _float_token(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def json_safe(value: Any, depth: int = MAX_ECHO_DEPTH) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` writes and UTF-8 encodes: lone
    surrogates become U+FFFD, non-finite floats the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"``, bytes are decoded with U+FFFD for what is not UTF-8, and any other object (an
    exception in an error's context) becomes its ``str``. Raises ``TooDeep`` past ``depth`` levels."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _float_token(value)
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping | list | tuple) and depth <= 0:
        raise TooDeep(f"nested deeper than {MAX_ECHO_DEPTH} levels")
    if isinstance(value, Mapping):
        return {scrub(str(k)): json_safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth - 1) for v in value]
    return scrub(str(value))


def unencodable(document: Any) -> Iterator[tuple[Location, str, Any]]:
    """``(location, kind, value)`` of each value in a decoded JSON document that cannot be encoded
    again, in document order: kind ``"surrogate"`` for a string or object key holding a lone
    surrogate (a bad key is located by itself), ``"non_finite"`` for a NaN or infinite float.
    Iterative, so that a deeply nested document cannot exhaust the stack."""
    stack: list[tuple[Location, Any]] = [((), document)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            if has_surrogate(value):
                yield loc, "surrogate", value
        elif isinstance(value, float):
            if not math.isfinite(value):
                yield loc, "non_finite", value
        elif isinstance(value, dict):
            children = []
            for key, child in value.items():
                if isinstance(key, str) and has_surrogate(key):
                    children.append(((*loc, key), key))  # reported as the bad string it is
                else:
                    children.append(((*loc, key), child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([((*loc, i), child) for i, child in enumerate(value)]))


def format_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's 422 items (``type``, ``loc``, ``msg`` and, where known, ``input`` and ``ctx``),
    at most ``MAX_REPORTED_ERRORS`` of them, each part made encodable; an input or context nested
    too deep to copy is left out."""
    items = []
    for e in errors[:MAX_REPORTED_ERRORS]:
        item: dict[str, Any] = {
            "type": scrub(str(e["type"])),
            "loc": [p if isinstance(p, int) else scrub(str(p)) for p in e["loc"]],
            "msg": scrub(str(e["msg"])),
        }
        for key in ("input", "ctx"):
            if key in e:
                try:
                    item[key] = json_safe(e[key])
                except TooDeep:
                    pass
        items.append(item)
    return items


async def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The app's handler for ``RequestValidationError``: a 422 whose body always encodes."""
    return JSONResponse(status_code=422, content={"detail": format_errors(exc.errors())})
