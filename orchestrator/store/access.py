"""Who may do what, stored beside the jobs: ``store.teams`` (data roots, quotas), ``store.tokens`` (hashes
only) and ``store.audit`` (the append-only audit log). The rules that use them live in
``orchestrator.auth``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, select

from orchestrator.store.records import AuditRecord, TeamRecord, TokenNotFound, TokenRecord
from orchestrator.store.tables import audit_t, teams_t, tokens_t
from orchestrator.store.transactions import Transactions


def _team(row: Any) -> TeamRecord:
    return TeamRecord(row.name, tuple(json.loads(row.roots)), {k: float(v) for k, v in json.loads(row.quotas).items()},
                      row.max_priority)


def _token(row: Any) -> TokenRecord:
    m = row._mapping
    return TokenRecord(**{k: m[k] for k in TokenRecord.__annotations__})


class TeamRepository:
    def __init__(self, tx: Transactions):
        self._tx = tx

    def all(self) -> dict[str, TeamRecord]:
        """Every team an admin has configured, by name."""
        with self._tx(write=False) as conn:
            return {r.name: _team(r) for r in conn.execute(select(teams_t).order_by(teams_t.c.name))}

    def get(self, name: str) -> TeamRecord:
        """The team's settings; a team nobody configured has no roots, no quotas and may use ``low``
        and ``normal``."""
        with self._tx(write=False) as conn:
            row = conn.execute(select(teams_t).where(teams_t.c.name == name)).first()
        return _team(row) if row is not None else TeamRecord(name)

    def put(self, name: str, roots: Iterable[str] | None = None,
                 quotas: Mapping[str, float] | None = None, max_priority: str | None = None) -> TeamRecord:
        """Create or update a team; an argument left None keeps what is stored (a new team's defaults)."""
        with self._tx() as conn:
            row = conn.execute(select(teams_t).where(teams_t.c.name == name)).first()
            current = _team(row) if row is not None else TeamRecord(name)
            new = TeamRecord(name, tuple(roots) if roots is not None else current.roots,
                             {k: float(v) for k, v in quotas.items()} if quotas is not None else current.quotas,
                             max_priority if max_priority is not None else current.max_priority)
            values = {"roots": json.dumps(list(new.roots)), "quotas": json.dumps(new.quotas),
                      "max_priority": new.max_priority, "updated_at": time.time()}
            if row is None:
                conn.execute(teams_t.insert().values(name=name, **values))
            else:
                conn.execute(teams_t.update().where(teams_t.c.name == name).values(**values))
        return new


class TokenRepository:
    def __init__(self, tx: Transactions):
        self._tx = tx

    def create(self, *, user: str, team: str, role: str, token_hash: str, created_by: str) -> TokenRecord:
        """Store a token by the SHA-256 of its secret (the caller made and hashed it; see auth.tokens)."""
        record = TokenRecord(id=f"tok_{secrets.token_hex(8)}", user=user, team=team, role=role,
                             created_at=time.time(), created_by=created_by, revoked_at=None)
        with self._tx() as conn:
            conn.execute(tokens_t.insert().values(token_hash=token_hash, **record.__dict__))
        return record

    def by_hash(self, token_hash: str) -> TokenRecord | None:
        """The token whose secret hashes to ``token_hash`` (revoked ones too: the caller refuses them).
        An indexed equality lookup on a hash: its timing says nothing about any secret's prefix."""
        with self._tx(write=False) as conn:
            row = conn.execute(select(tokens_t).where(tokens_t.c.token_hash == token_hash)).first()
        return _token(row) if row is not None else None

    def list(self, include_revoked: bool = False) -> list[TokenRecord]:
        q = select(tokens_t).order_by(tokens_t.c.created_at, tokens_t.c.id)
        if not include_revoked:
            q = q.where(tokens_t.c.revoked_at.is_(None))
        with self._tx(write=False) as conn:
            return [_token(r) for r in conn.execute(q)]

    def revoke(self, token_id: str) -> tuple[TokenRecord, str]:
        """Mark the token revoked (a second revoke keeps the first time); returns it and its hash, so
        the caller can drop it from any cache. Raises TokenNotFound."""
        with self._tx() as conn:
            row = conn.execute(select(tokens_t).where(tokens_t.c.id == token_id)).first()
            if row is None:
                raise TokenNotFound(token_id)
            if row.revoked_at is None:
                conn.execute(tokens_t.update().where(tokens_t.c.id == token_id).values(revoked_at=time.time()))
                row = conn.execute(select(tokens_t).where(tokens_t.c.id == token_id)).one()
        return _token(row), row.token_hash


class AuditLog:
    def __init__(self, tx: Transactions):
        self._tx = tx

    def record(self, actor: str, action: str, target: str, detail: str = "", team: str | None = None) -> None:
        """Append one entry: ``actor`` (a user name, ``admin`` or ``scheduler``) did ``action`` (submit,
        cancel, resize, preempt, token.create, ...) to ``target`` (a job id, token id or team)."""
        with self._tx() as conn:
            conn.execute(audit_t.insert().values(at=time.time(), actor=actor, team=team, action=action,
                                                 target=target, detail=detail))

    def list(self, limit: int = 100, offset: int = 0, team: str | None = None) -> tuple[list[AuditRecord], int]:
        """Entries newest first, and how many match in all; ``team``: that team's only."""
        q = select(audit_t).order_by(audit_t.c.seq.desc()).limit(limit).offset(offset)
        count_q = select(func.count()).select_from(audit_t)
        if team is not None:
            q, count_q = q.where(audit_t.c.team == team), count_q.where(audit_t.c.team == team)
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
            total = conn.execute(count_q).scalar_one()
        return [AuditRecord(r.seq, r.at, r.actor, r.team, r.action, r.target, r.detail) for r in rows], total
