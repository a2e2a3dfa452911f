"""Request dependencies as ``Annotated`` aliases; everything lives on ``app.state`` (see app.py).

Those that only read attributes are ``async``: FastAPI runs a sync dependency in its thread pool, and
four thread hand-offs per request were most of the submit latency. ``VisibleJob`` and ``VisibleSweep``
read the store, so they run in the pool: the job (or sweep) a route's path names, 404 when there is
none or the principal may not see it (service.visible_job).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from orchestrator.api.schemas.base import IDEMPOTENCY_KEY_PATTERN, JOB_ID_PATTERN, Problem
from orchestrator.api.security import require_admin, require_token
from orchestrator.api.service import visible_job, visible_sweep
from orchestrator.auth import Authenticator, Principal
from orchestrator.controller.loop import Controller
from orchestrator.ray_client import RayJobs
from orchestrator.settings import Settings
from orchestrator.store import JobRecord, Store
from orchestrator.telemetry import Telemetry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_ray(request: Request) -> RayJobs:
    return request.app.state.ray


async def get_controller(request: Request) -> Controller | None:
    return request.app.state.controller


async def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


async def get_authenticator(request: Request) -> Authenticator:
    return request.app.state.authenticator


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RayDep = Annotated[RayJobs, Depends(get_ray)]
ControllerDep = Annotated[Controller | None, Depends(get_controller)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
AuthenticatorDep = Annotated[Authenticator, Depends(get_authenticator)]
# Who the request acts for (any valid token), and the same refusing non-admins with 403.
PrincipalDep = Annotated[Principal, Depends(require_token)]
AdminDep = Annotated[Principal, Depends(require_admin)]

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id")]
SweepId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the sweep's id (a job id)")]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN,
           description="repeat a POST safely: the same key and body return the same job"),
]
JOB_NOT_FOUND = {404: {"model": Problem, "description": "no such job (or another team's)"}}
SWEEP_NOT_FOUND = {404: {"model": Problem, "description": "no such sweep (or another team's, or not a sweep)"}}


def get_visible_job(job_id: JobId, store: StoreDep, principal: PrincipalDep) -> JobRecord:
    return visible_job(store, job_id, principal)


def get_visible_sweep(sweep_id: SweepId, store: StoreDep, principal: PrincipalDep) -> JobRecord:
    return visible_sweep(store, sweep_id, principal)


VisibleJob = Annotated[JobRecord, Depends(get_visible_job)]
VisibleSweep = Annotated[JobRecord, Depends(get_visible_sweep)]
