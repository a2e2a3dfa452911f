"""A scripted stand-in for Ray (orchestrator.ray_client.RayJobs): tests drive it one step at a time."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from orchestrator.ray_client import LogSlice, NodeView, RayJobView, RayRefused, RayUnavailable, UnmanagedJob
from workers.contracts import TrainSummary
from workers.progress import ProgressRecord


def progress_line(step: int, total: int, loss: float, tokens_per_s: float = 100.0) -> str:
    """A training driver's progress line (the figures a fake does not model are zero)."""
    return ProgressRecord(step=step, total_steps=total, loss=loss, lr=1e-3, tokens_per_s=tokens_per_s, wire_bytes=0,
                          dense_bytes=0, compression=1.0, max_vio=0.0, drop_frac=0.0).to_line()


def summary_json(**figures: object) -> str:
    """A training run's summary.json with ``figures`` set (the rest neutral; keys the contract does
    not name are kept, as a newer writer's would be)."""
    summary = {"steps": 1, "final_loss": 1.0, "final_loss_window": 1, "eval_loss": None, "tokens_per_s": 1.0,
               "wire_bytes": 0, "dense_bytes": 0, "compression": 1.0, "world_size": 1,
               "moe": {"max_vio": [0.0], "drop_frac": [0.0]}, "name": "fake", "method": "none", "density": 1.0,
               "error_feedback": False, "wall_time_s": 0.0, "checkpoint": "", "spec": {}} | figures
    TrainSummary.model_validate(summary)
    return json.dumps(summary)


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
        # A CPU-only head and a GPU node (the API and CLI tests read these figures); tests replace it.
        self.node_list = [
            NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 4.0, "memory": 8e9, "node:__internal_head__": 1.0}),
            NodeView("n2", "127.0.0.2", False, "ALIVE", {"CPU": 8.0, "GPU": 1.0, "memory": 16e9})]
        self.unmanaged: list[UnmanagedJob] = []  # what `ray job submit` jobs hold
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
                self.job_logs[submission_id] = progress_line(1, 1, 1.5) + "\n"

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

    def read_log(self, submission_id, start, max_bytes) -> LogSlice:
        self._check()
        data = self.job_logs.get(submission_id, "").encode()
        begin = max(0, len(data) - max_bytes) if start is None else min(start, len(data))
        return LogSlice(data[begin:begin + max_bytes], begin, len(data))

    async def tail(self, submission_id) -> AsyncIterator[str]:
        text = self.job_logs.get(submission_id, "")
        if text:
            yield text

    def nodes(self):
        self._check()
        return list(self.node_list)

    def unmanaged_jobs(self):
        self._check()
        return list(self.unmanaged)

    # -- scripting --------------------------------------------------------------------------------

    def set(self, submission_id, status, **kw) -> None:
        self.jobs[submission_id] = replace(self.jobs.get(submission_id) or RayJobView(submission_id, status),
                                           status=status, **kw)

    def restart_cluster(self) -> None:
        """A new cluster at the same address: it knows none of the old submissions."""
        self.jobs.clear()


class FakeDemand:
    """A stand-in for orchestrator.controller.demand_groups.DemandSink: records what each pass published, and
    how many submissions Ray had seen by then (demand must be withdrawn before a submission)."""

    def __init__(self, ray: FakeRay):
        self.ray = ray
        self.published: list[tuple[dict, int]] = []  # (job id -> DemandGroup, submissions so far)
        self.closed = False

    def publish(self, waiting) -> None:
        self.published.append((dict(waiting), len(self.ray.submissions)))

    def close(self) -> None:
        self.closed = True
