"""One reconcile loop: a daemon thread that runs ``reconcile_once`` every ``interval_s`` seconds, and at
once after ``wake()`` (a submit, a cancel, a new deployment), so a user's request is acted on in one
pass instead of one interval. The job controller (orchestrator/controller/loop.py) and the deployment
reconciler (orchestrator/deployments/reconciler.py) are both one; each says only what one pass does,
how long to wait between passes and what to do with a pass that failed.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class ReconcileLoop:
    """Subclasses define ``reconcile_once``, ``interval_s`` (seconds between passes) and
    ``stop_timeout_s`` (how long ``stop`` waits for a pass in progress); ``pass_failed`` may say more
    than the log line about a pass that raised."""

    thread_name = "orch-reconcile"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        raise NotImplementedError

    @property
    def stop_timeout_s(self) -> float:
        raise NotImplementedError

    def reconcile_once(self) -> None:
        raise NotImplementedError

    def pass_failed(self, error: Exception) -> None:
        """A pass raised: logged, and the next pass tries again (one bad pass must not end the loop)."""
        log.exception("%s: reconcile pass failed", self.thread_name, exc_info=error)

    def wake(self) -> None:
        """Run the next pass now instead of at the next interval."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass: a wake that arrives during it runs one more pass at once.
            self._wake.clear()
            try:
                self.reconcile_once()
            except Exception as e:  # noqa: BLE001 (pass_failed reports it)
                self.pass_failed(e)
            self._wake.wait(self.interval_s)
