"""The controller's view of Ray: a small protocol, and its implementation on Ray's public SDKs.

The Jobs SDK (``ray.job_submission.JobSubmissionClient``) and the state API talk HTTP to the Ray
dashboard, so a remote cluster works exactly like a local one. Tests replace ``RayJobs`` with a fake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

RAY_TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})
# Where a Ray node's job supervisor writes a driver's output, in that node's session logs folder
# (ray.dashboard.modules.job.common.JOB_LOGS_PATH_TEMPLATE).
DRIVER_LOG = "job-driver-{}.log"
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
STREAM_CHUNK_BYTES = 1 << 20  # one piece of a log streamed from Ray's state API


class RayUnavailable(RuntimeError):
    """The cluster could not be reached; nothing is known, try again later."""


class RayRefused(RuntimeError):
    """Ray answered and refused the request (bad runtime env, bad request): retrying will not help."""


@dataclass(frozen=True)
class RayJobView:
    submission_id: str
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED (ray.job_submission.JobStatus)
    message: str | None = None
    error_type: str | None = None  # ray.job_submission.JobErrorType
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in RAY_TERMINAL


@dataclass(frozen=True)
class LogSlice:
    """Bytes ``[start, end)`` of a driver's log, which was ``size`` bytes long when read."""
    data: bytes
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def whole_lines(self) -> tuple[str, int]:
        """The complete lines of a slice read from a line start, and the offset after them (where the
        next read starts, so a line being written is read whole next time). A line longer than a whole
        read is passed over rather than read forever."""
        cut = self.data.rfind(b"\n") + 1
        if cut == 0 and self.end < self.size:
            cut = len(self.data)
        return self.data[:cut].decode(errors="replace"), self.start + cut


@dataclass(frozen=True)
class NodeView:
    node_id: str
    ip: str
    is_head: bool
    state: str
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # ray start --labels, ray.io/accelerator-type


@dataclass(frozen=True)
class UnmanagedJob:
    """A Ray job the service did not submit (``ray job submit``) and what its placement groups hold
    per node (Ray Train's worker groups are placement groups; Ray Data's loose tasks are not counted)."""
    submission_id: str | None
    ray_job_id: str | None
    status: str
    node_resources: dict[str, dict[str, float]] = field(default_factory=dict)


class RayJobs(Protocol):
    def submit(
        self, *, submission_id: str, entrypoint: str, runtime_env: dict[str, Any], metadata: dict[str, str],
        entrypoint_resources: dict[str, float],
    ) -> None:
        """Submit; an already existing ``submission_id`` is not an error (the call is idempotent)."""

    def status(self, submission_id: str) -> RayJobView | None:
        """What Ray reports, or None when this cluster does not know the submission."""

    def stop(self, submission_id: str) -> None: ...

    def read_log(self, submission_id: str, start: int | None, max_bytes: int) -> LogSlice:
        """At most ``max_bytes`` of the driver's log from byte ``start``, or (``start`` None) its last
        ``max_bytes``; a submission Ray does not know reads as an empty log. What one call costs the
        service is bounded by ``max_bytes``, however long the log."""

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """Log chunks as the driver writes them, ending when the Ray job ends."""

    def nodes(self) -> list[NodeView]: ...

    def unmanaged_jobs(self) -> list[UnmanagedJob]:
        """Non-terminal Ray jobs without the service's ``orch_job_id`` metadata."""


class SdkRayJobs:
    """``RayJobs`` over the Ray Jobs SDK and state API, with a timeout on every HTTP call.

    ``logs_dir``: the Ray session's logs folder when the head runs on this machine (``orch up``:
    ``<ray temp dir>/session_latest/logs``). A driver's log found there is read by offset, so a read
    costs what it returns. Otherwise (a remote cluster, a driver on another node) the log comes through
    Ray's state API, which can only stream a driver's log whole: memory stays bounded by ``max_bytes``
    but every read moves the whole file over the network."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0,
                 logs_dir: Path | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.logs_dir = logs_dir
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client: Any = None
        self._lock = threading.Lock()

    def _jobs(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _make_client(self.address, self._headers, self.timeout_s)
            return self._client

    def _call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return getattr(self._jobs(), fn_name)(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout, ConnectionError, AuthenticationError) as e:
            with self._lock:
                self._client = None  # reconnect (and re-check the version) next time
            hint = " (set ORCH_RAY_AUTH_TOKEN)" if isinstance(e, AuthenticationError) else ""
            raise RayUnavailable(f"Ray at {self.address} is not reachable{hint}: {_short(e)}") from None

    def submit(self, *, submission_id, entrypoint, runtime_env, metadata, entrypoint_resources) -> None:
        try:
            self._call(
                "submit_job", submission_id=submission_id, entrypoint=entrypoint, runtime_env=runtime_env,
                metadata=metadata, entrypoint_resources=entrypoint_resources or None,
            )
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            if "already exists" in str(e):
                return
            code = _status_code(e)
            if code is not None and 400 <= code < 500:
                raise RayRefused(_short(e)) from None
            # 5xx, e.g. "No available agent to submit job, please try again later": transient.
            raise RayUnavailable(_short(e)) from None

    def status(self, submission_id: str) -> RayJobView | None:
        try:
            info = self._call("get_job_info", submission_id)
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            if "status code 404" in str(e) or "does not exist" in str(e):
                return None
            raise RayUnavailable(_short(e)) from None
        return RayJobView(
            submission_id=submission_id,
            status=str(getattr(info.status, "value", info.status)),
            message=info.message,
            error_type=str(getattr(info.error_type, "value", info.error_type)) if info.error_type else None,
            exit_code=getattr(info, "driver_exit_code", None),
        )

    def stop(self, submission_id: str) -> None:
        try:
            self._call("stop_job", submission_id)
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            if "does not exist" not in str(e):
                raise RayUnavailable(_short(e)) from None

    def read_log(self, submission_id: str, start: int | None, max_bytes: int) -> LogSlice:
        if self.logs_dir is not None and _SUBMISSION_ID.fullmatch(submission_id):  # a name, never a path
            try:
                return read_file(self.logs_dir / DRIVER_LOG.format(submission_id), start, max_bytes)
            except FileNotFoundError:
                pass  # the driver ran on another node or in an earlier session of the head: ask Ray
        return self._stream_log(submission_id, start, max_bytes)

    def _stream_log(self, submission_id: str, start: int | None, max_bytes: int) -> LogSlice:
        """The slice, kept from Ray's state API stream of the whole log (its ``lines=-1``)."""
        import requests

        try:
            info = self._call("get_job_info", submission_id)
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            if "status code 404" in str(e) or "does not exist" in str(e):
                return LogSlice(b"", 0, 0)
            raise RayUnavailable(_short(e)) from None
        node_id = getattr(info, "driver_node_id", None)
        if not node_id:
            return LogSlice(b"", 0, 0)  # the driver has not started: nothing written yet
        params = {"node_id": node_id, "submission_id": submission_id, "lines": -1, "timeout": int(self.timeout_s)}
        window, size = bytearray(), 0
        try:
            with requests.get(f"{self._jobs().get_address()}/api/v0/logs/file", params=params, headers=self._headers,
                              stream=True, timeout=self.timeout_s) as r:
                if r.status_code != 200:
                    log.info("no log for %s from Ray: %s", submission_id, _short(RuntimeError(r.text)))
                    return LogSlice(b"", 0, 0)
                for chunk in r.iter_content(chunk_size=STREAM_CHUNK_BYTES):
                    if start is None:
                        window += chunk
                        del window[:max(0, len(window) - max_bytes)]
                    else:  # the part of [start, start + max_bytes) in this chunk, which begins at byte size
                        window += chunk[max(0, start - size):max(0, start + max_bytes - size)]
                    size += len(chunk)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise RayUnavailable(f"Ray at {self.address} is not reachable: {_short(e)}") from None
        begin = size - len(window) if start is None else min(start, size)
        return LogSlice(bytes(window), begin, size)

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        try:
            client = await asyncio.to_thread(self._jobs)
            async for chunk in client.tail_job_logs(submission_id):
                yield chunk
        except Exception as e:  # noqa: BLE001 - any failure (unknown job, head gone, auth) ends this tail
            # The caller decides whether to reopen it.
            log.info("log tail for %s ended: %s", submission_id, _short(e))

    def nodes(self) -> list[NodeView]:
        import requests
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource
        from ray.util.state.exception import ServerUnavailable

        try:
            client = StateApiClient(address=self.address, headers={"Content-Type": "application/json", **self._headers})
            rows = client.list(
                StateResource.NODES, options=ListApiOptions(detail=True, timeout=int(self.timeout_s)),
                raise_on_missing_output=False,
            )
        # The state API wraps a refused connection as ServerUnavailable (the dashboard is down).
        except (requests.ConnectionError, requests.Timeout, ConnectionError, ServerUnavailable) as e:
            raise RayUnavailable(f"Ray at {self.address} is not reachable: {e}") from None
        return [
            NodeView(
                node_id=n.node_id, ip=n.node_ip, is_head=bool(n.is_head_node), state=str(n.state),
                resources={k: float(v) for k, v in (n.resources_total or {}).items()},
                labels={str(k): str(v) for k, v in (n.labels or {}).items()},
            )
            for n in rows
        ]

    def unmanaged_jobs(self) -> list[UnmanagedJob]:
        import requests
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        try:
            listed = self._call("list_jobs")
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            raise RayUnavailable(_short(e)) from None
        jobs = [j for j in listed
                if str(getattr(j.status, "value", j.status)) not in RAY_TERMINAL
                and "orch_job_id" not in (j.metadata or {})]
        if not jobs:
            return []
        from ray.util.state.exception import ServerUnavailable

        try:
            client = StateApiClient(address=self.address, headers={"Content-Type": "application/json", **self._headers})
            groups = client.list(
                StateResource.PLACEMENT_GROUPS, options=ListApiOptions(
                    detail=True, timeout=int(self.timeout_s), filters=[("state", "=", "CREATED")]),
                raise_on_missing_output=False,
            )
        except (requests.ConnectionError, requests.Timeout, ConnectionError, ServerUnavailable) as e:
            raise RayUnavailable(f"Ray at {self.address} is not reachable: {e}") from None
        held: dict[str, dict[str, dict[str, float]]] = {}
        for g in groups:
            per_node = held.setdefault(g.creator_job_id, {})
            for bundle in g.bundles or []:
                node = per_node.setdefault(bundle.get("node_id") or "", {})
                for k, v in (bundle.get("unit_resources") or {}).items():
                    node[k] = node.get(k, 0.0) + float(v)
        return [UnmanagedJob(submission_id=j.submission_id, ray_job_id=j.job_id,
                             status=str(getattr(j.status, "value", j.status)),
                             node_resources=held.get(j.job_id or "", {}))
                for j in jobs]


def read_file(path: Path, start: int | None, max_bytes: int) -> LogSlice:
    """``RayJobs.read_log`` of a log file on this machine: one positioned read of at most ``max_bytes``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        begin = max(0, size - max_bytes) if start is None else min(start, size)
        return LogSlice(os.pread(fd, min(max_bytes, size - begin), begin), begin, size)
    finally:
        os.close(fd)


def _make_client(address: str, headers: dict[str, str], timeout_s: float) -> Any:
    from ray.job_submission import JobSubmissionClient

    class _TimedClient(JobSubmissionClient):
        # The SDK's public methods take no timeout; every request goes through _do_request, which
        # forwards keyword arguments to requests. Without this a hung dashboard hangs the controller.
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return _TimedClient(address, headers=dict(headers))


def _status_code(e: BaseException) -> int | None:
    # The SDK raises RuntimeError(f"Request failed with status code {code}: {text}.")
    m = re.search(r"status code (\d{3})", str(e))
    return int(m.group(1)) if m else None


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:limit]


class NoRay:
    """``RayJobs`` when no cluster is configured: every call reports Ray unreachable."""

    def _down(self, *args: Any, **kwargs: Any) -> Any:
        raise RayUnavailable("no Ray cluster configured: set RAY_ADDRESS (the dashboard URL) or run `orch up`")

    submit = status = stop = read_log = nodes = unmanaged_jobs = _down

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        return
        yield  # an empty async generator
