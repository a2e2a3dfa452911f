"""A scripted stand-in for Ray (orchestrator.ray_client.RayJobs): tests drive it one step at a time."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from orchestrator.ray_client import NodeView, RayJobView, RayRefused, RayUnavailable


class FakeRay:
    def __init__(self, auto_run: bool = False):
        # auto_run: a submitted job is RUNNING at once and SUCCEEDED on the next look (API tests).
        self.auto_run = auto_run
        self.jobs: dict[str, RayJobView] = {}
        self.submissions: list[dict] = []
        self.stops: list[str] = []
        self.job_logs: dict[str, str] = {}
        self.reachable = True
        self.refuse: str | None = None
        self._lock = threading.Lock()

    def _check(self) -> None:
        if not self.reachable:
            raise RayUnavailable("fake Ray is down")

    # -- the RayJobs protocol ---------------------------------------------------------------------

    def submit(self, *, submission_id, entrypoint, runtime_env, metadata, entrypoint_resources) -> None:
        self._check()
        if self.refuse:
            raise RayRefused(self.refuse)
        with self._lock:
            if submission_id in self.jobs:
                return
            self.submissions.append({"submission_id": submission_id, "entrypoint": entrypoint,
                                     "runtime_env": runtime_env, "metadata": metadata,
                                     "entrypoint_resources": entrypoint_resources})
            self.jobs[submission_id] = RayJobView(submission_id, "RUNNING" if self.auto_run else "PENDING")
            if self.auto_run:
                self.job_logs[submission_id] = "[progress] step=1/1 loss=1.5 tokens_per_s=100\n"

    def status(self, submission_id):
        self._check()
        with self._lock:
            view = self.jobs.get(submission_id)
            if view is not None and self.auto_run and view.status == "RUNNING":
                self.jobs[submission_id] = replace(view, status="SUCCEEDED", exit_code=0)
            return view

    def stop(self, submission_id) -> None:
        self._check()
        self.stops.append(submission_id)
        view = self.jobs.get(submission_id)
        if view is not None and not view.terminal:
            self.jobs[submission_id] = replace(view, status="STOPPED", message="stopped")

    def logs(self, submission_id) -> str:
        self._check()
        return self.job_logs.get(submission_id, "")

    async def tail(self, submission_id) -> AsyncIterator[str]:
        text = self.job_logs.get(submission_id, "")
        if text:
            yield text

    def nodes(self):
        self._check()
        return [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 4.0, "memory": 8e9, "node:__internal_head__": 1.0}),
                NodeView("n2", "127.0.0.2", False, "ALIVE", {"CPU": 8.0, "GPU": 1.0, "memory": 16e9})]

    # -- scripting --------------------------------------------------------------------------------

    def set(self, submission_id, status, **kw) -> None:
        self.jobs[submission_id] = replace(self.jobs.get(submission_id) or RayJobView(submission_id, status),
                                           status=status, **kw)

    def restart_cluster(self) -> None:
        """A new cluster at the same address: it knows none of the old submissions."""
        self.jobs.clear()
