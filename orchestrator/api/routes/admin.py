"""/v1/tokens and /v1/teams (admin only: 403 for users) and /v1/audit (admin: every entry; a user:
its team's). Every change here is itself audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.exceptions import RequestValidationError

from jobs.specs.base import NAME_PATTERN
from orchestrator.api import service
from orchestrator.api.deps import AdminDep, AuthenticatorDep, PrincipalDep, StoreDep
from orchestrator.api.schemas.access import (
    AuditEntry,
    AuditPublic,
    TeamPublic,
    TeamsPublic,
    TeamUpdate,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    TokensPublic,
)
from orchestrator.api.schemas.base import TOKEN_ID_PATTERN, Problem, TeamFilter
from orchestrator.auth import RESERVED_USERS, new_token
from orchestrator.store import TokenNotFound

router = APIRouter(tags=["access"])
_ADMIN_ONLY = {403: {"model": Problem, "description": "admin only"}}
_WITH_BODY = {**_ADMIN_ONLY, 400: {"model": Problem, "description": "the body is not decodable text"},
              413: {"model": Problem, "description": "request body over ORCH_MAX_BODY_BYTES"}}
TokenId = Annotated[str, Path(pattern=TOKEN_ID_PATTERN, description="token id (orch token list)")]
TeamPath = Annotated[str, Path(pattern=NAME_PATTERN, description="team name")]


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 located like pydantic's, for a rule of the body that its schema cannot state."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


@router.post("/v1/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated, responses=_WITH_BODY)
def create_token(body: TokenCreate, store: StoreDep, admin: AdminDep) -> TokenCreated:
    """A new token for ``user`` in ``team``. The answer holds the secret; nothing can show it again
    (only its SHA-256 is stored). Role ``scrape`` is for Prometheus: it reads ``/metrics`` (every
    team's series) and nothing else."""
    if body.user in RESERVED_USERS:
        raise _invalid("user", f"{body.user!r} is reserved for the service")
    if body.role == "user" and body.team == "admin":
        raise _invalid("team", "'admin' holds the bootstrap admin's jobs; give users a team of their own")
    secret, token_hash = new_token()
    record = store.tokens.create(user=body.user, team=body.team, role=body.role, token_hash=token_hash,
                                 created_by=admin.user)
    store.audit.record(admin.user, "token.create", record.id, detail=f"user={record.user} role={record.role}",
                       team=record.team)
    return TokenCreated(**TokenPublic.of(record).model_dump(), token=secret)


@router.get("/v1/tokens", response_model=TokensPublic, responses=_ADMIN_ONLY)
def list_tokens(store: StoreDep, _: AdminDep,
                include_revoked: Annotated[bool, Query(description="list revoked tokens too")] = False) -> TokensPublic:
    """Tokens, oldest first, without their secrets."""
    return TokensPublic(data=[TokenPublic.of(t) for t in store.tokens.list(include_revoked=include_revoked)])


@router.delete("/v1/tokens/{token_id}", response_model=TokenPublic,
               responses={**_ADMIN_ONLY, 404: {"model": Problem, "description": "no such token"}})
def revoke_token(token_id: TokenId, store: StoreDep, authenticator: AuthenticatorDep, admin: AdminDep) -> TokenPublic:
    """Revoke a token: refused (401) from now on in this process, in other API processes within
    ORCH_TOKEN_CACHE_S. Revoking twice is not an error."""
    try:
        record, token_hash = store.tokens.revoke(token_id)
    except TokenNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token {token_id}") from None
    authenticator.forget(token_hash)
    store.audit.record(admin.user, "token.revoke", record.id, detail=f"user={record.user}", team=record.team)
    return TokenPublic.of(record)


@router.get("/v1/teams", response_model=TeamsPublic, responses=_ADMIN_ONLY)
def list_teams(store: StoreDep, _: AdminDep) -> TeamsPublic:
    return TeamsPublic(data=[TeamPublic.of(t) for t in store.teams.all().values()])


@router.get("/v1/teams/{team}", response_model=TeamPublic, responses=_ADMIN_ONLY)
def get_team(team: TeamPath, store: StoreDep, _: AdminDep) -> TeamPublic:
    """A team's data roots, quotas and highest priority (a team nobody configured: none, none, normal)."""
    return TeamPublic.of(store.teams.get(team))


@router.put("/v1/teams/{team}", response_model=TeamPublic, responses=_WITH_BODY)
def set_team(team: TeamPath, body: TeamUpdate, store: StoreDep, admin: AdminDep) -> TeamPublic:
    """Set a team's data roots, quotas and/or highest priority; a field left out keeps its value."""
    record = store.teams.put(team, roots=body.roots, quotas=body.quotas, max_priority=body.max_priority)
    store.audit.record(admin.user, "team.set", team, detail=body.model_dump_json(exclude_none=True), team=team)
    return TeamPublic.of(record)


@router.get("/v1/audit", response_model=AuditPublic, responses=_ADMIN_ONLY)
def audit_log(
    store: StoreDep,
    principal: PrincipalDep,
    team: TeamFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AuditPublic:
    """Who submitted, cancelled, resized or preempted what, newest first: a user's team's entries, or
    (admin) everyone's."""
    entries, count = store.audit.list(limit=limit, offset=offset, team=service.listed_team(principal, team))
    return AuditPublic(data=[AuditEntry.of(e) for e in entries], count=count)
