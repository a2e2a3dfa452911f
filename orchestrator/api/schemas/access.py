"""API schemas of tokens, teams and the audit log (routes/admin.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from orchestrator.api.schemas.base import Name, Priority, Request, Schema
from orchestrator.auth import Role, root_error
from orchestrator.auth.roots import ROOT_PATTERN
from orchestrator.store import AuditRecord, TeamRecord, TokenRecord

MAX_ROOTS = 64
MAX_QUOTAS = 64
MAX_QUOTA_DEVICES = 1_000_000.0


def _data_root(value: str) -> str:
    error = root_error(value)
    if error is not None:
        raise ValueError(error)
    return value


DataRoot = Annotated[str, Field(min_length=1, max_length=4096, pattern=ROOT_PATTERN), AfterValidator(_data_root)]
# Strict: a JSON number only (``false`` is not a quota of 0).
Devices = Annotated[float, Field(ge=0.0, le=MAX_QUOTA_DEVICES, strict=True)]


class TokenCreate(Request):
    user: Name
    team: Name
    role: Role = "user"


class TokenPublic(Schema):
    """A token as listed: never its secret (only its hash is stored)."""

    id: str
    user: str
    team: str
    role: Role
    created_at: float
    created_by: str
    revoked_at: float | None

    @classmethod
    def of(cls, t: TokenRecord) -> TokenPublic:
        return cls(id=t.id, user=t.user, team=t.team, role=t.role, created_at=t.created_at,  # type: ignore[arg-type]
                   created_by=t.created_by, revoked_at=t.revoked_at)


class TokenCreated(TokenPublic):
    token: str  # the secret: shown in this answer only, never again


class TokensPublic(Schema):
    data: list[TokenPublic]


class TeamUpdate(Request):
    """A team's settings; a field left out keeps its stored value."""

    # Absolute local folders or s3://bucket[/prefix] (orchestrator/auth/roots.py).
    roots: list[DataRoot] | None = Field(None, max_length=MAX_ROOTS)
    # Pool or device name -> devices (GPUs/NPUs for gpu/npu pools, CPUs for cpu pools).
    quotas: dict[Name, Devices] | None = Field(None, max_length=MAX_QUOTAS)
    # The highest priority the team's users may submit at (a new team: normal).
    max_priority: Priority | None = None


class TeamPublic(Schema):
    name: str
    roots: list[str]
    quotas: dict[str, float]
    max_priority: Priority

    @classmethod
    def of(cls, t: TeamRecord) -> TeamPublic:
        return cls(name=t.name, roots=list(t.roots), quotas=t.quotas, max_priority=t.max_priority)  # type: ignore[arg-type]


class TeamsPublic(Schema):
    data: list[TeamPublic]


class AuditEntry(Schema):
    seq: int
    at: float
    actor: str
    team: str | None
    action: str
    target: str
    detail: str

    @classmethod
    def of(cls, a: AuditRecord) -> AuditEntry:
        return cls(seq=a.seq, at=a.at, actor=a.actor, team=a.team, action=a.action, target=a.target, detail=a.detail)


class AuditPublic(Schema):
    data: list[AuditEntry]
    count: int
