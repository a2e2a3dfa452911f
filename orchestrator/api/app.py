"""The FastAPI application factory: store, Ray client, controller and routes wired from Settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api.errors import http_error_response, validation_error_response
from orchestrator.api.middleware import HttpMetrics
from orchestrator.api.routes import admin, cluster, curves, deployments, jobs, logs, sweeps, system, ui
from orchestrator.api.schemas.base import Problem
from orchestrator.api.security import TokenGuard, require_token
from orchestrator.auth import Authenticator
from orchestrator.controller.entrypoints import ALLOWED_ENTRYPOINTS
from orchestrator.controller.loop import Controller
from orchestrator.deployments.reconciler import DeploymentReconciler
from orchestrator.deployments.serve_status import ServeStatus
from orchestrator.ray_client import NoRay, RayJobs, SdkRayJobs
from orchestrator.settings import Settings
from orchestrator.store import Store
from orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"


def make_ray_client(settings: Settings) -> RayJobs:
    if not settings.ray_address:
        return NoRay()
    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    return SdkRayJobs(settings.ray_address, token=token, timeout_s=settings.ray_timeout_s,
                      logs_dir=settings.ray_logs_dir)


def create_app(settings: Settings, *, ray: RayJobs | None = None, store: Store | None = None,
               entrypoints: dict[str, str] = ALLOWED_ENTRYPOINTS) -> FastAPI:
    """Build the service. ``ray``, ``store`` and the entry-point allow-list are injectable for tests
    (clients only ever choose a job kind); the controller thread starts with the app's lifespan when
    ``settings.controller_enabled``."""
    store = store or Store(settings.database_url, settings.sqlite_synchronous)
    ray = ray or make_ray_client(settings)
    telemetry = Telemetry(store.jobs.count_by_state)
    controller = (Controller(store, ray, settings, telemetry, entrypoints=entrypoints)
                  if settings.controller_enabled else None)
    # Serving deployments have their own reconciler (orchestrator/deployments/reconciler.py); it needs a cluster.
    reconciler = None
    if settings.controller_enabled and settings.ray_address:
        token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
        reconciler = DeploymentReconciler(store, ray, ServeStatus(settings.ray_address, token, settings.ray_timeout_s),
                                          settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if controller is not None:
            controller.start()
        if reconciler is not None:
            reconciler.start()
        try:
            yield
        finally:
            if reconciler is not None:
                reconciler.stop()
            if controller is not None:
                controller.stop()

    app = FastAPI(
        title="orch: MoE training control plane", version=API_VERSION, lifespan=lifespan,
        # Served behind the token by routes/system.py; no CDN-backed docs pages.
        openapi_url=None, docs_url=None, redoc_url=None,
        max_body_size=settings.max_body_bytes,
        # One formatter for every 422: it echoes inputs only in a form that always encodes.
        exception_handlers={RequestValidationError: validation_error_response,
                            StarletteHTTPException: http_error_response},
    )
    app.state.settings = settings
    app.state.store = store
    app.state.ray = ray
    app.state.telemetry = telemetry
    app.state.controller = controller
    app.state.deployments = reconciler
    app.state.authenticator = Authenticator(settings.token, store, settings.token_cache_s)

    unauthorized = {401: {"model": Problem, "description": "missing or invalid bearer token"}}
    app.include_router(system.public)
    app.include_router(system.private, responses=unauthorized)
    for router in (jobs.router, sweeps.router, cluster.router, deployments.router):
        app.include_router(router, dependencies=[Depends(require_token)], responses=unauthorized)
    app.include_router(admin.router, responses=unauthorized)  # each route states its own rule (admin.py)
    # A job's logs and curve read the same job with the same authorization as /v1/jobs (routes/logs.py,
    # routes/curves.py).
    for router in (logs.router, curves.router):
        app.include_router(router, dependencies=[Depends(require_token)], responses=unauthorized)
    app.add_middleware(TokenGuard, authenticator=app.state.authenticator)
    app.add_middleware(HttpMetrics, telemetry=telemetry)
    # Outermost: the dashboard's static files need no token (they hold no data; see routes/ui.py).
    app.add_middleware(ui.UiAssets)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory orchestrator.api.app:app_from_env``: settings from ORCH_* variables."""
    from orchestrator.settings import load_settings

    return create_app(load_settings())
