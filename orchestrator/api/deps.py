"""Request dependencies as ``Annotated`` aliases; everything lives on ``app.state`` (see app.py).

They are ``async`` because they only read attributes: FastAPI runs a sync dependency in its thread
pool, and four thread hand-offs per request were most of the submit latency.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from orchestrator.api.security import require_admin, require_token
from orchestrator.auth import Authenticator, Principal
from orchestrator.controller import Controller
from orchestrator.ray_client import RayJobs
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.telemetry import Telemetry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
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
StoreDep = Annotated[JobStore, Depends(get_store)]
RayDep = Annotated[RayJobs, Depends(get_ray)]
ControllerDep = Annotated[Controller | None, Depends(get_controller)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
AuthenticatorDep = Annotated[Authenticator, Depends(get_authenticator)]
# Who the request acts for (any valid token), and the same refusing non-admins with 403.
PrincipalDep = Annotated[Principal, Depends(require_token)]
AdminDep = Annotated[Principal, Depends(require_admin)]
