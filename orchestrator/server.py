"""Run the app under uvicorn: in the foreground (``orch up``) or in a background thread (tests, bench)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI

SERVER_START_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, url: str, output: Callable[[], str],
                       timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Polls ``url``/healthz until it answers 200. Raises RuntimeError with the tail of ``output()``
    if ``proc`` (the server's process) exits first, and kills it if the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {output()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not answer {url}/healthz within {timeout_s:.0f} s")


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


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
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(SERVER_START_TIMEOUT_S)
