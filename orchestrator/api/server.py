"""Run the app under uvicorn in the foreground (``orch up``). Tests and the bench serve it from a
background thread instead: tests/support/servers.py."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)
