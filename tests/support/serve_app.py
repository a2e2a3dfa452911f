"""Run the service as its own process for crash tests: settings from ORCH_* variables, and the
``train`` kind mapped to tests.support.fake_train (tests only; the service's allow-list is fixed).

``--crash-at POINT`` injects a controller fault hook that SIGKILLs this process at that named point
(e.g. ``before_submit``), so a test can check what the next service makes of the state it left.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from orchestrator.api.app import create_app
from orchestrator.api.server import serve
from orchestrator.settings import load_settings

FAKE_ENTRYPOINTS = {"train": "tests.support.fake_train"}
log = logging.getLogger(__name__)


def crash_at(point: str):
    """A fault hook that kills this process (SIGKILL: no cleanup, like a power cut) at ``point``."""

    def hook(reached: str) -> None:
        if reached == point:
            log.warning("fault hook: killing this process at %s", reached)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crash-at", help="SIGKILL this process when the controller reaches this point")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = load_settings()
    app = create_app(settings, entrypoints=FAKE_ENTRYPOINTS)
    if args.crash_at:
        # Set before serving: the controller thread starts with the app's lifespan.
        app.state.controller.fault_hook = crash_at(args.crash_at)
    serve(app, settings.host, settings.port, log_level="warning")
