"""Run the service as its own process for crash tests: settings from ORCH_* variables, and the
``train`` kind mapped to tests.orchestrator.fake_train (tests only; the service's allow-list is fixed)."""

from __future__ import annotations

import logging

from orchestrator.api.app import create_app
from orchestrator.server import serve
from orchestrator.settings import load_settings

FAKE_ENTRYPOINTS = {"train": "tests.orchestrator.fake_train"}

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    settings = load_settings()
    serve(create_app(settings, entrypoints=FAKE_ENTRYPOINTS), settings.host, settings.port, log_level="warning")
