"""The one reconcile loop (orchestrator/reconcile.py) that the controller and the deployment
reconciler both are, and the one request base class (orchestrator/api/schemas/base.py) every body is."""

from __future__ import annotations

import threading
from typing import get_args

from fastapi.routing import APIRoute
from pydantic import BaseModel

from orchestrator.api.routes import admin, cluster, curves, deployments, jobs, logs, sweeps
from orchestrator.api.schemas.base import Request
from orchestrator.controller.loop import Controller
from orchestrator.deployments.reconciler import DeploymentReconciler
from orchestrator.reconcile import ReconcileLoop
from tests.support.control_plane import AUTH
from tests.unit.orchestrator.test_api import JSON_CT, strict_json

ROUTE_MODULES = (admin, cluster, curves, deployments, jobs, logs, sweeps)  # system.py takes no body
WAIT_S = 10.0  # bounds each wait below; a pass takes microseconds


class Counting(ReconcileLoop):
    """Counts passes; its first pass raises, as a store error would."""

    thread_name = "test-loop"
    interval_s = 3600.0  # only a wake runs another pass
    stop_timeout_s = WAIT_S

    def __init__(self):
        super().__init__()
        self.passes = 0
        self.failed: list[Exception] = []
        self.ran = threading.Event()

    def reconcile_once(self) -> None:
        self.passes += 1
        self.ran.set()
        if self.passes == 1:
            raise RuntimeError("a bad first pass")

    def pass_failed(self, error: Exception) -> None:
        self.failed.append(error)


def test_a_failed_pass_does_not_end_the_loop_and_a_wake_runs_the_next_pass_at_once():
    loop = Counting()
    loop.start()
    try:
        assert loop.ran.wait(WAIT_S)
        loop.ran.clear()
        loop.wake()  # long before the hour's interval
        assert loop.ran.wait(WAIT_S), "wake() did not run a pass"
        assert loop.passes == 2 and [str(e) for e in loop.failed] == ["a bad first pass"]
    finally:
        loop.stop()
    assert not loop._thread.is_alive()


def test_the_controller_and_the_deployment_reconciler_are_the_one_loop():
    assert issubclass(Controller, ReconcileLoop) and issubclass(DeploymentReconciler, ReconcileLoop)
    for cls in (Controller, DeploymentReconciler):
        assert "_loop" not in vars(cls) and "wake" not in vars(cls), f"{cls.__name__} has its own loop code"


def test_every_request_body_is_one_request_base():
    routes = [r for module in ROUTE_MODULES for r in module.router.routes if isinstance(r, APIRoute)]
    bodies = {p.field_info.annotation for r in routes for p in r.dependant.body_params}
    models = {m for b in bodies for m in (get_args(b) or (b,)) if isinstance(m, type) and issubclass(m, BaseModel)}
    assert {"JobCreate", "SweepCreate", "DeploymentCreate", "TeamUpdate", "ResizeWorkers"} <= {m.__name__ for m in models}
    assert not [m.__name__ for m in models if not issubclass(m, Request)]


def test_an_unencodable_value_is_the_same_422_in_every_body(client):
    """One check for every body: team settings answered pydantic's own "string_unicode" where a job's
    body answered "string_surrogate"; both say the same now, at the value's location."""
    for method, path, raw, loc in [
        ("POST", "/v1/jobs", rb'{"spec": {"data": {"source": "/data/\udfffx"}}}', ["body", "spec", "data", "source"]),
        ("PUT", "/v1/teams/ml", rb'{"roots": ["/data/\udfffx"]}', ["body", "roots", 0]),
    ]:
        r = client.request(method, path, content=raw, headers=JSON_CT)
        assert r.status_code == 422, path
        assert {"loc": loc, "type": "string_surrogate"} in [
            {"loc": e["loc"], "type": e["type"]} for e in strict_json(r)["detail"]], path
    assert client.get("/v1/teams/ml", headers=AUTH).json()["roots"] == []
