"""The controller's view of Ray: a small protocol, and its implementation on Ray's public SDKs.

The Jobs SDK (``ray.job_submission.JobSubmissionClient``) and the state API talk HTTP to the Ray
dashboard, so a remote cluster works exactly like a local one. Tests replace ``RayJobs`` with a fake.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

RAY_TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})


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

    def logs(self, submission_id: str) -> str: ...

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """Log chunks as the driver writes them, ending when the Ray job ends."""

    def nodes(self) -> list[NodeView]: ...

    def unmanaged_jobs(self) -> list[UnmanagedJob]:
        """Non-terminal Ray jobs without the service's ``orch_job_id`` metadata."""


class SdkRayJobs:
    """``RayJobs`` over the Ray Jobs SDK and state API, with a timeout on every HTTP call."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0):
        self.address = address
        self.timeout_s = timeout_s
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

    def logs(self, submission_id: str) -> str:
        try:
            return self._call("get_job_logs", submission_id)
        except RuntimeError as e:
            if isinstance(e, RayUnavailable):
                raise
            if "does not exist" in str(e):
                return ""
            raise RayUnavailable(_short(e)) from None

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

    submit = status = stop = logs = nodes = unmanaged_jobs = _down

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        return
        yield  # an empty async generator
