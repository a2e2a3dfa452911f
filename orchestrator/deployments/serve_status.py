"""What Ray Serve says about the deployments: its applications (one REST read per reconciler pass,
from the dashboard's read-only endpoint) and each replica's serving figures (``/v1/stats``, read with
the service's per-deployment stats key for the web dashboard's deployment page)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from orchestrator.ray_client import RayUnavailable
from orchestrator.settings import Settings
from orchestrator.store import DeploymentRecord

SERVE_APPS_PATH = "/api/serve/applications/"


@dataclass(frozen=True)
class AppView:
    """One Serve application as the dashboard reports it."""
    status: str  # NOT_STARTED, DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING
    message: str
    route_prefix: str | None
    replicas: dict[str, int] = field(default_factory=dict)  # replica state -> count, over its deployments


def parse_applications(details: Mapping[str, Any]) -> dict[str, AppView]:
    """Serve's instance details (the REST answer) -> application name -> AppView."""
    apps = {}
    for name, app in (details.get("applications") or {}).items():
        replicas: dict[str, int] = {}
        for dep in (app.get("deployments") or {}).values():
            for replica in dep.get("replicas") or []:
                replicas[replica["state"]] = replicas.get(replica["state"], 0) + 1
        apps[name] = AppView(status=app.get("status", "NOT_STARTED"), message=app.get("message") or "",
                             route_prefix=app.get("route_prefix"), replicas=replicas)
    return apps


class ServeStatus:
    """Serve's applications, read from the dashboard's REST API (the same address and token as the
    Jobs SDK)."""

    def __init__(self, address: str, token: str | None, timeout_s: float):
        self.url = address.rstrip("/") + SERVE_APPS_PATH
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s

    def applications(self) -> dict[str, AppView]:
        try:
            r = httpx.get(self.url, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            raise RayUnavailable(f"Serve status at {self.url}: {e}") from None
        if r.status_code != 200:
            raise RayUnavailable(f"Serve status at {self.url}: HTTP {r.status_code} {r.text[:200]}")
        return parse_applications(r.json())


# The web dashboard's deployment page reads its replicas' figures through the service (the user's
# token, scoped to the team), never Serve directly: the service asks /v1/stats with its stats key.
STATS_TIMEOUT_S = 5.0
# /v1/stats answers for the replica Serve's proxy picks: one ask per running replica, at most this
# many, gathers most of them (the answers are deduplicated by replica).
MAX_STATS_ASKS = 8


def stats_key(settings: Settings, deployment_id: str) -> str:
    """The key the service reads a deployment's /v1/stats with: an HMAC of its id under the API
    token, so nothing secret is stored (the spec holds its SHA-256, ``stats_key_sha256``) and every
    process of the service derives the same key. It reads those figures and nothing else."""
    return hmac.new(settings.token.encode(), f"serve-stats:{deployment_id}".encode(), hashlib.sha256).hexdigest()


class StatsUnavailable(Exception):
    """Serve did not answer the stats, or refused the service's key; the message says which."""


async def replica_stats(settings: Settings, d: DeploymentRecord) -> list[dict[str, Any]]:
    """The /v1/stats answers of the deployment's running replicas (as many as one ask per replica
    reaches), each once, ordered by replica id."""
    url = f"{settings.serve_base_url}{d.route_prefix.rstrip('/')}/v1/stats"
    asks = max(1, min(MAX_STATS_ASKS, d.replicas.get("RUNNING", 0)))
    headers = {"Authorization": f"Bearer {stats_key(settings, d.id)}"}
    async with httpx.AsyncClient(timeout=STATS_TIMEOUT_S) as client:
        answers = await asyncio.gather(*(client.get(url, headers=headers) for _ in range(asks)),
                                       return_exceptions=True)
    found: dict[str, dict[str, Any]] = {}
    for r in answers:
        if isinstance(r, BaseException):
            raise StatsUnavailable(f"Serve at {url} did not answer: {r!r}")
        if r.status_code == 401:
            raise StatsUnavailable("the replica refused the service's stats key (a deployment made before "
                                   "stats were read, or under another API token: redeploy it to see its figures)")
        if r.status_code != 200:
            raise StatsUnavailable(f"Serve at {url}: HTTP {r.status_code} {r.text[:200]}")
        body = r.json()
        found[str(body.get("replica"))] = body
    return [found[k] for k in sorted(found)]
