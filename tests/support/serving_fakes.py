"""A stand-in for a deployment's Serve replicas where a test needs their /v1/stats only (the
control plane's stats route, the dashboard's deployment page) and not a model: it answers
``<prefix>/v1/stats`` for the key whose SHA-256 the deployment's spec holds (``stats_key_sha256``),
as the real replica's ``require_key`` does, and 401 for any other. The real replica's answer is
checked in tests/integration/serving/test_deployments.py."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def figures(replica: str = "replica-1", **changes: Any) -> dict[str, Any]:
    """One replica's /v1/stats body (workers/serving/schemas.py ReplicaStats)."""
    return {"replica": replica, "checkpoint": "/ckpt", "int8": False, "requests": 7, "rows": 9,
            "completion_tokens": 120, "tokens_generated": 130, "running_rows": 2, "prefix_hit_tokens": 0,
            "batch_sizes": {1: 3, 4: 2}, "mean_batch_rows": 2.2, "ttft_ms_p50": 12.5, "ttft_ms_p95": 30.0,
            "tpot_ms_p50": 4.25, "tpot_ms_p95": 9.5, "queue_wait_ms_p50": 1.5, "queue_wait_ms_p95": 6.0,
            "prompt_tokens_per_s": 40.0, "completion_tokens_per_s": 88.5,
            "requests_by_status": {"200": 7, "422": 1}, **changes}


class FakeReplicas:
    """``answers``: replica id -> its body; each ask is answered by the next replica in turn (as
    Serve's proxy spreads them). ``key_sha256``: the stats key's hash it takes (set by the test)."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.key_sha256: str | None = None
        self.asks = 0
        self.app = FastAPI()
        self.app.add_api_route("/{prefix:path}/v1/stats", self._stats)

    async def _stats(self, request: Request) -> JSONResponse:
        self.asks += 1
        _, _, key = request.headers.get("authorization", "").partition(" ")
        if self.key_sha256 is None or hashlib.sha256(key.encode()).hexdigest() != self.key_sha256:
            return JSONResponse({"detail": "missing or wrong API key"}, status_code=401)
        bodies = list(self.answers.values())
        return JSONResponse(bodies[self.asks % len(bodies)])
