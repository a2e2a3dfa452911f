"""Bearer-token authentication, enforced for every path but /healthz, and the principal it yields.

The ASGI guard runs before routing and body parsing, so nothing (not even a malformed body or an
unknown path) reaches the app without a valid token: the bootstrap admin's (``ORCH_API_TOKEN``) or a
user's that is not revoked (``orchestrator.auth.Authenticator``; cached per process, so a request
costs no database read). It leaves the principal in the request's state; ``require_token`` reads it
there (or checks again, should the app run without the guard), declares the scheme in the OpenAPI
document, and ``require_admin`` refuses users with 403. A ``scrape`` token (Prometheus) gets a 403
on every path but ``/metrics``, from the guard before routing and again from ``require_token``.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api.errors import query_errors
from orchestrator.auth import SCRAPE_PATHS, Authenticator, Principal

PUBLIC_PATHS = frozenset({"/healthz"})
PRINCIPAL_STATE = "principal"  # the key under the request's state
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
SCRAPE_ONLY = "a scrape token may read /metrics only"


def _refused(principal: Principal, path: str) -> bool:
    return principal.is_scraper and path not in SCRAPE_PATHS


class TokenGuard:
    def __init__(self, app: ASGIApp, authenticator: Authenticator):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        auth = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        principal = await self.authenticator.principal_async(auth)
        if principal is not None and not _refused(principal, scope["path"]):
            # A new dict: the server hands each request a copy of the lifespan state, but be sure of it.
            scope["state"] = {**scope.get("state", {}), PRINCIPAL_STATE: principal}
            await self.app(scope, receive, send)
            return
        if principal is None:
            await _refuse(send, 401, "missing or invalid bearer token", ((b"www-authenticate", b"Bearer"),))
        else:
            await _refuse(send, 403, SCRAPE_ONLY)


async def _refuse(send: Send, status_code: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status_code, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers,
    ]})
    await send({"type": "http.response.body", "body": body})


_bearer = HTTPBearer(auto_error=False, description="ORCH_API_TOKEN, or a user token from `orch token create`")


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    principal = getattr(request.state, PRINCIPAL_STATE, None)
    if principal is None:
        given = f"Bearer {credentials.credentials}" if credentials else None
        principal = await request.app.state.authenticator.principal_async(given)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers=_CHALLENGE)
    if _refused(principal, request.scope["path"]):
        raise HTTPException(status.HTTP_403_FORBIDDEN, SCRAPE_ONLY)
    # Every route behind the token runs this first: the one place to refuse a query parameter no
    # route declares, or one given twice that takes one value (errors.py).
    errors = query_errors(request)
    if errors:
        raise RequestValidationError(errors)
    return principal


async def require_admin(principal: Annotated[Principal, Depends(require_token)]) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin only")
    return principal
