"""Bearer-token authentication: one constant-time check, enforced for every path but /healthz.

The ASGI guard runs before routing and body parsing, so nothing (not even a malformed body or an
unknown path) reaches the app without the token; the ``require_token`` dependency repeats the check
per route and declares the scheme in the OpenAPI document.
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

PUBLIC_PATHS = frozenset({"/healthz"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def token_ok(authorization: str | None, expected: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


class TokenGuard:
    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        auth = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if token_ok(auth, self.token):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or invalid bearer token"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})


_bearer = HTTPBearer(auto_error=False, description="ORCH_API_TOKEN")


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    expected = request.app.state.settings.token
    given = f"Bearer {credentials.credentials}" if credentials else None
    if not token_ok(given, expected):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers=_CHALLENGE)
