"""API tokens: the bootstrap admin's (``ORCH_API_TOKEN``, a setting) and users' (made by an admin).

A user token is ``orch_`` + 43 URL-safe characters (256 random bits): the prefix lets secret scanners
recognise a leaked one. It is shown once, when made; the store keeps only its SHA-256, so a copy of
the database grants nothing. A salt or a slow hash would add nothing for 256-bit random secrets
(no dictionary to attack) and would cost every request.

``Authenticator`` answers "who is this?" for every request, before routing. The admin token is
compared in constant time; a user token is hashed and looked up by its hash (an index lookup on a
hash leaks nothing about the secret's bytes). Lookups are cached per process for
``cache_ttl_s`` (ORCH_TOKEN_CACHE_S) so that a request costs no database round trip: a revoke in
this process drops its entry at once; another API process sharing the database stops accepting a
revoked token within ``cache_ttl_s``. Unknown tokens are not cached (a flood of random tokens must
not evict the real ones); each costs one indexed read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

import anyio.to_thread

from orchestrator.auth.principals import ADMIN, Principal
from orchestrator.store import Store

TOKEN_PREFIX = "orch_"
TOKEN_BYTES = 32  # 256 random bits
TOKEN_CACHE_MAX_ENTRIES = 10_000  # distinct live tokens one process remembers; past it the cache restarts


def new_token() -> tuple[str, str]:
    """A new user token and the hash to store: ``(secret, sha256_hex)``."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return secret, hash_token(secret)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_secret(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


class Authenticator:
    def __init__(self, admin_token: str, store: Store, cache_ttl_s: float):
        self._admin_token = admin_token.encode()
        self._store = store
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}  # token hash -> (principal, expires at, monotonic)
        self._lock = threading.Lock()

    def _cached(self, secret: str) -> tuple[str, Principal | None]:
        """``(hash, principal)`` without I/O: the admin, a cached user, or None (look in the store)."""
        if hmac.compare_digest(secret.encode(), self._admin_token):
            return "", ADMIN
        token_hash = hash_token(secret)
        with self._lock:
            hit = self._cache.get(token_hash)
        if hit is not None and hit[1] > time.monotonic():
            return token_hash, hit[0]
        return token_hash, None

    def _from_store(self, token_hash: str) -> Principal | None:
        record = self._store.tokens.by_hash(token_hash)
        if record is None or record.revoked:
            return None
        principal = Principal(user=record.user, team=record.team, role=record.role)  # type: ignore[arg-type]
        with self._lock:
            if len(self._cache) >= TOKEN_CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[token_hash] = (principal, time.monotonic() + self._ttl_s)
        return principal

    def principal(self, authorization: str | None) -> Principal | None:
        """The principal behind an ``Authorization`` header, or None (missing, unknown or revoked).
        May read the store: call it from a worker thread in async code, or use ``principal_async``."""
        secret = bearer_secret(authorization)
        if secret is None:
            return None
        token_hash, principal = self._cached(secret)
        return principal if principal is not None else self._from_store(token_hash)

    async def principal_async(self, authorization: str | None) -> Principal | None:
        """``principal`` for the event loop: a cache hit costs no thread hand-off."""
        secret = bearer_secret(authorization)
        if secret is None:
            return None
        token_hash, principal = self._cached(secret)
        return principal if principal is not None else await anyio.to_thread.run_sync(self._from_store, token_hash)

    def forget(self, token_hash: str) -> None:
        """Drop a revoked token from this process's cache: its next request is refused."""
        with self._lock:
            self._cache.pop(token_hash, None)
