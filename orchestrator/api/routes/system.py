"""/healthz (no token), /metrics (Prometheus text) and /openapi.json (behind the token).

``/metrics`` answers by who asks: an admin or a ``scrape`` token (made for Prometheus: ``orch token
create --user prometheus --team admin --role scrape``; it may read nothing else) gets every series; a
user gets the service-wide figures and its own team's jobs only (orchestrator/telemetry.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.deps import PrincipalDep, StoreDep, TelemetryDep
from orchestrator.api.schemas.base import Health, Problem
from orchestrator.api.security import require_token

public = APIRouter(tags=["service"])
private = APIRouter(tags=["service"], dependencies=[Depends(require_token)])


@public.get("/healthz", response_model=Health, responses={503: {"model": Problem}})
async def healthz(store: StoreDep) -> Health:
    """Liveness and store reachability; the only route without a token, so it says nothing more."""
    try:
        await run_in_threadpool(store.ping)
    except Exception:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "store unavailable") from None
    return Health(status="ok")


@private.get("/metrics", response_class=Response, response_model=None,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(telemetry: TelemetryDep, store: StoreDep, principal: PrincipalDep) -> Response:
    """Prometheus text exposition: HTTP traffic, controller passes, submissions, retries, jobs by state
    and RUNNING jobs' training figures; a user's token sees only its team's jobs in them."""
    def render() -> bytes:
        if principal.sees_every_team:
            return telemetry.render()
        return telemetry.render_team(principal.team, store.jobs.unfinished_ids(principal.team))

    return Response(await run_in_threadpool(render), media_type=CONTENT_TYPE_LATEST)


@private.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
