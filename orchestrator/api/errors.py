"""Client input made safe to store and to echo: any request gets a 422 naming the field, never a 500.

Python's json module decodes two kinds of value that no JSON encoder writes back: lone UTF-16
surrogates (a ``"\\udfff"`` escape becomes a str that UTF-8 cannot encode) and the ``NaN``,
``Infinity`` and ``-Infinity`` tokens (and literals such as ``1e999`` that overflow to infinity).
FastAPI's own 422 handler echoes each error's input and crashed on them, as did a response carrying
one back. So ``unencodable`` finds them in a request body (``JobCreate`` rejects them, located), and
``validation_error_response`` is the one formatter of every request validation error: locations,
messages, inputs and contexts go through ``json_safe``.

``http_error_response`` is the handler of every ``HTTPException``: FastAPI's own, less two breaches
of the documented contract. A 422 raised with a string (a rule no schema states: a reserved user
name, a job that can never fit) answers the documented ``HTTPValidationError``, a list of ``{loc,
msg, type}``; and a 405's ``Allow`` lists every method the document gives the path, where Starlette
lists those of the first route it matched (``POST /v1/jobs`` answered ``Allow: POST``; GET is there too);
and a JSON body that is not UTF-8 is the 422 ``json_invalid`` that any other undecodable body gets,
where FastAPI answers a bare 400.
``query_errors`` makes a query parameter no route declares a 422 (FastAPI ignores it, so ``?limt=5``
silently listed 100), as does a single-valued one given twice (FastAPI keeps the last).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

# Errors listed per 422: a 1 MiB body of NaN tokens would otherwise list some 200,000.
MAX_REPORTED_ERRORS = 50
# Nesting levels of an echoed input or context; a deeper one is left out of its error.
MAX_ECHO_DEPTH = 32

Location = tuple[str | int, ...]
_SURROGATE = re.compile("[\ud800-\udfff]")
# "field.path: message", the form of a string 422 that names its field (see ``string_detail_errors``).
_FIELD_MESSAGE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): (.+)", re.DOTALL)


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


def string_detail_errors(detail: str) -> list[dict[str, Any]]:
    """A string 422 detail as the one-item list ``HTTPValidationError`` promises: located in the body,
    at the field its message starts with (``"user: 'admin' is reserved"`` -> ``["body", "user"]``)."""
    m = _FIELD_MESSAGE.fullmatch(detail)
    loc: list[str | int] = ["body"]
    if m is not None:
        loc += [int(p) if p.isdigit() else p for p in m.group(1).split(".")]
        detail = m.group(2)
    return [{"type": "value_error", "loc": loc, "msg": scrub(detail)}]


async def http_error_response(request: Request, exc: HTTPException) -> Response:
    """The app's handler for ``HTTPException`` (see the module docstring)."""
    if exc.status_code == 422 and isinstance(exc.detail, str):
        return JSONResponse(status_code=422, content={"detail": string_detail_errors(exc.detail)}, headers=exc.headers)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        return JSONResponse(status_code=422, content={"detail": [invalid_utf8_error(exc.__cause__)]})
    if exc.status_code == 405:
        allow = ", ".join(documented_methods(request.app.openapi(), request.scope["path"]))
        exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": allow})
    return await http_exception_handler(request, exc)


def invalid_utf8_error(e: UnicodeDecodeError) -> dict[str, Any]:
    """A JSON body that is not UTF-8, as the ``json_invalid`` error FastAPI gives any other undecodable
    body (located at the first bad byte); FastAPI itself answers it with a bare 400."""
    return {"type": "json_invalid", "loc": ["body", e.start], "msg": "JSON decode error",
            "ctx": {"error": f"invalid UTF-8 byte 0x{e.object[e.start]:02x} at {e.start}"}}


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def documented_methods(document: Mapping[str, Any], path: str) -> list[str]:
    """The methods the OpenAPI ``document`` gives the paths that ``path`` matches (``{param}``: one
    path segment), upper case and sorted: what a 405's ``Allow`` must list."""
    methods: set[str] = set()
    for template, operations in document.get("paths", {}).items():
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^}]*\})", template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in operations if m in _HTTP_METHODS}
    return sorted(methods)


def _query_params(dependant: Any) -> dict[str, bool]:
    """The query parameters a route and its dependencies take, each with whether it may repeat (a
    list), walked per request (a handful of nodes)."""
    params = {p.alias: _repeatable(p.field_info.annotation) for p in dependant.query_params}
    for sub in dependant.dependencies:
        params |= _query_params(sub)
    return params


def _repeatable(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin in (Union, UnionType) and any(_repeatable(a) for a in get_args(annotation))


def query_errors(request: Request) -> list[dict[str, Any]]:
    """A 422 item for each query parameter the matched route does not declare, and for each one
    given twice that takes one value (FastAPI would keep the last silently); none off a route."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return []
    declared = _query_params(dependant)
    errors = []
    for name in dict.fromkeys(request.query_params.keys()):
        if name not in declared:
            errors.append({"type": "extra_forbidden", "loc": ("query", scrub(name)), "msg": "Extra inputs are not permitted"})
        elif not declared[name] and len(request.query_params.getlist(name)) > 1:
            errors.append({"type": "too_long", "loc": ("query", name), "msg": "takes one value, given several"})
    return errors[:MAX_REPORTED_ERRORS]
