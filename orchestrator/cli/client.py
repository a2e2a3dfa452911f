"""The orch API as the CLI sees it: one typed method per request, API errors as CliError.

Each method returns the API's JSON as it came (the form ``--json`` prints) and raises CliError for an
error answer (naming the request, the status and the API's detail; exit 2 for a 422) or an API that
cannot be reached. The client reads ORCH_API_TOKEN, or in local mode the token file
``<ORCH_STATE_DIR>/api_token`` that `orch up --local` wrote.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer

from jobs.specs.base import field_errors
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError, api_url

REQUEST_TIMEOUT_S = 30.0
SUBMIT_ATTEMPTS = 3  # a submission carries an Idempotency-Key, so a lost answer is safely asked again
RETRY_BACKOFF_S = 0.5  # doubled after each failed attempt

Json = dict[str, Any]


def _token() -> str:
    if os.environ.get("ORCH_API_TOKEN"):
        return os.environ["ORCH_API_TOKEN"]
    from orchestrator.settings import SettingsError, local_token

    state_dir = Path(os.environ.get("ORCH_STATE_DIR", Path.home() / ".orch")).expanduser()
    try:
        return local_token(state_dir, create=False)
    except SettingsError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def check(r: httpx.Response) -> Any:
    """The response's JSON, or CliError naming the request, the status and the API's detail
    (exit 2 for a 422: the spec or an option was invalid)."""
    if r.is_success:
        return r.json()
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        detail = "\n  ".join(field_errors(detail, skip=1, root="<body>"))
    code = EXIT_USAGE if r.status_code == 422 else EXIT_FAILED
    raise CliError(f"{r.request.method} {r.request.url.path}: {r.status_code} {detail}", code)


def connect(ctx: typer.Context) -> OrchClient:
    """The command's client for the ``--url`` given; closed when the command ends."""
    return ctx.with_resource(OrchClient(api_url(ctx)))


class OrchClient:
    def __init__(self, url: str):
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S,
                                  headers={"Authorization": f"Bearer {_token()}"})

    def __enter__(self) -> OrchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _unreachable(self, e: httpx.TransportError) -> CliError:
        return CliError(f"cannot reach the API at {self.url}: {e}")

    def _call(self, method: str, path: str, attempts: int = 1, **kw: Any) -> Any:
        """One request; with ``attempts`` > 1, transport errors are retried (only for a POST that
        carries an Idempotency-Key, or a read)."""
        for i in range(attempts):
            try:
                return check(self._http.request(method, path, **kw))
            except httpx.TransportError as e:
                if i == attempts - 1:
                    raise self._unreachable(e) from None
                time.sleep(RETRY_BACKOFF_S * 2**i)
        raise AssertionError("unreachable")

    def _submit(self, path: str, body: Json, idempotency_key: str | None) -> Json:
        # A key per invocation makes the client's own retries safe; a caller's key makes reruns safe.
        headers = {"Idempotency-Key": idempotency_key or f"cli-{uuid.uuid4()}"}
        return self._call("POST", path, attempts=SUBMIT_ATTEMPTS, json=body, headers=headers)

    # -- jobs ----------------------------------------------------------------------------------

    def submit_job(self, body: Json, idempotency_key: str | None = None) -> Json:
        return self._submit("/v1/jobs", body, idempotency_key)

    def jobs(self, states: list[str], limit: int) -> Json:
        return self._call("GET", "/v1/jobs", params={"state": states, "limit": limit})

    def job(self, job_id: str) -> Json:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def logs(self, job_id: str, attempt: int | None = None, tail: int | None = None,
             before: int | None = None) -> Json:
        params = {k: v for k, v in {"attempt": attempt, "tail": tail, "before": before}.items() if v is not None}
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params=params)

    def follow_logs(self, job_id: str, tail: int | None = None) -> Iterator[str]:
        """The job's log text as it is written, until the job ends (or the server's ORCH_FOLLOW_MAX_S
        passes). No read timeout: a quiet job sends nothing for long stretches."""
        params = {"follow": "true", **({"tail": tail} if tail else {})}
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None) as r:
                if not r.is_success:
                    r.read()
                    check(r)
                yield from r.iter_text()
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    def cancel_job(self, job_id: str) -> Json:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def resize_job(self, job_id: str, body: Json) -> Json:
        return self._call("PATCH", f"/v1/jobs/{job_id}", json=body)

    def cluster(self) -> Json:
        return self._call("GET", "/v1/cluster")

    # -- sweeps --------------------------------------------------------------------------------

    def submit_sweep(self, body: Json) -> Json:
        return self._submit("/v1/sweeps", body, None)

    def sweep(self, sweep_id: str) -> Json:
        return self._call("GET", f"/v1/sweeps/{sweep_id}")

    def stop_trial(self, sweep_id: str, trial_id: str) -> Json:
        return self._call("POST", f"/v1/sweeps/{sweep_id}/trials/{trial_id}/stop")

    # -- deployments ---------------------------------------------------------------------------

    def create_deployment(self, body: Json) -> Json:
        return self._call("POST", "/v1/deployments", json=body)  # no retry: a second POST is a second deployment

    def deployments(self) -> Json:
        return self._call("GET", "/v1/deployments")

    def deployment(self, deployment_id: str) -> Json:
        return self._call("GET", f"/v1/deployments/{deployment_id}")

    def delete_deployment(self, deployment_id: str) -> Json:
        return self._call("DELETE", f"/v1/deployments/{deployment_id}")

    # -- access --------------------------------------------------------------------------------

    def create_token(self, user: str, team: str, role: str) -> Json:
        return self._call("POST", "/v1/tokens", json={"user": user, "team": team, "role": role})

    def tokens(self, include_revoked: bool) -> Json:
        return self._call("GET", "/v1/tokens", params={"include_revoked": include_revoked})

    def revoke_token(self, token_id: str) -> Json:
        return self._call("DELETE", f"/v1/tokens/{token_id}")

    def set_team(self, name: str, body: Json) -> Json:
        return self._call("PUT", f"/v1/teams/{name}", json=body)

    def team(self, name: str) -> Json:
        return self._call("GET", f"/v1/teams/{name}")

    def teams(self) -> Json:
        return self._call("GET", "/v1/teams")

    def audit(self, team: str | None, limit: int) -> Json:
        return self._call("GET", "/v1/audit", params={"limit": limit} | ({"team": team} if team else {}))
