"""HTTP to the orch API: the bearer token, one client per command, API errors as CliError.

The client reads ORCH_API_TOKEN, or in local mode the token file ``<ORCH_STATE_DIR>/api_token`` that
`orch up --local` wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from jobs.specs import field_errors
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError

REQUEST_TIMEOUT_S = 30.0
SUBMIT_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5  # doubled after each failed attempt


def _token() -> str:
    if os.environ.get("ORCH_API_TOKEN"):
        return os.environ["ORCH_API_TOKEN"]
    from orchestrator.settings import SettingsError, local_token

    state_dir = Path(os.environ.get("ORCH_STATE_DIR", Path.home() / ".orch")).expanduser()
    try:
        return local_token(state_dir, create=False)
    except SettingsError as e:
        raise CliError(str(e), EXIT_USAGE) from None


@contextmanager
def api(url: str) -> Iterator[httpx.Client]:
    """A client for ``url``; a transport error anywhere in the block is `cannot reach the API`."""
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S,
                      headers={"Authorization": f"Bearer {_token()}"}) as c:
        try:
            yield c
        except httpx.TransportError as e:
            raise CliError(f"cannot reach the API at {url}: {e}") from None


def check(r: httpx.Response) -> Any:
    """The response's JSON, or CliError naming the request, the status and the API's detail
    (exit 2 for a 422: the spec or an option was invalid)."""
    if r.is_success:
        return r.json()
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        detail = "\n  ".join(field_errors(detail, skip=1, root="<body>"))
    code = EXIT_USAGE if r.status_code == 422 else EXIT_FAILED
    raise CliError(f"{r.request.method} {r.request.url.path}: {r.status_code} {detail}", code)


def request_with_retries(c: httpx.Client, method: str, url: str, attempts: int = SUBMIT_ATTEMPTS,
                         **kw: Any) -> Any:
    """Retries transport errors only; safe for a POST that carries an Idempotency-Key."""
    for i in range(attempts):
        try:
            return check(c.request(method, url, **kw))
        except httpx.TransportError:
            if i == attempts - 1:
                raise
            time.sleep(RETRY_BACKOFF_S * 2**i)
    raise AssertionError("unreachable")
