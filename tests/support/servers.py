"""Serving the API for tests and the bench: in a background thread of this process, or as a child
process awaited until its /healthz answers. ``orch up`` serves in the foreground (orchestrator/api/server.py)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI

from orchestrator.local.head import free_port
from workers.waiting import wait_until

SERVER_START_TIMEOUT_S = 30.0
HEALTH_POLL_S = 0.1
STARTED_POLL_S = 0.02

__all__ = ["BackgroundServer", "free_port", "wait_until_healthy"]


def wait_until_healthy(proc: subprocess.Popen, url: str, output: Callable[[], str],
                       timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Polls ``url``/healthz until it answers 200. Raises RuntimeError with the tail of ``output()``
    if ``proc`` (the server's process) exits first; kills it and raises TimeoutError if the timeout passes."""

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {output()[-2000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout_s=timeout_s, interval_s=HEALTH_POLL_S, what=f"{url}/healthz to answer 200")
    except TimeoutError:
        proc.kill()
        raise


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` on loopback until the block ends."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="orch-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()

        def started() -> bool:
            if self.server.started:
                return True
            if not self.thread.is_alive():
                raise RuntimeError("the API server thread ended before it started serving")
            return False

        wait_until(started, timeout_s=SERVER_START_TIMEOUT_S, interval_s=STARTED_POLL_S,
                   what=f"the API server to start on {self.url}")
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(SERVER_START_TIMEOUT_S)


class S3Server:
    """``with S3Server() as endpoint:`` a real S3-protocol server (moto's server mode) on loopback
    for the test session; ``env()`` is the AWS_* environment a client (or a job) needs to reach it."""

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"
    REGION = "us-east-1"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY, "AWS_REGION": self.REGION}

    def __enter__(self) -> S3Server:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
