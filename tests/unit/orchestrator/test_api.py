"""The REST API against a fake Ray: auth on every route, validation, idempotency, cancel, logs, cluster."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from orchestrator.api.app import create_app
from orchestrator.api.errors import MAX_REPORTED_ERRORS
from orchestrator.states import JobState
from tests.support.control_plane import AUTH, TINY_SPEC
from tests.support.servers import BackgroundServer
from workers.waiting import wait_until

DEADLINE_S = 20.0
POLL_S = 0.05


def _walk(routes, prefix=""):
    """Every (method, path) served, through included routers (FastAPI >= 0.16x keeps them nested)."""
    for r in routes:
        if isinstance(r, (APIRoute, Route)):
            for method in sorted(r.methods - {"HEAD", "OPTIONS"}):
                yield method, prefix + r.path
        elif hasattr(r, "original_router"):
            yield from _walk(r.original_router.routes, prefix + r.include_context.prefix)


def _routes(app):
    return [(m, re.sub(r"\{[^}]+\}", "abc123", p)) for m, p in _walk(app.routes) if p != "/healthz"]


def _app_routes():
    from orchestrator.settings import Settings
    from tests.support.fakes import FakeRay

    app = create_app(Settings(api_token="x" * 32, state_dir="/tmp/orch-route-listing", controller_enabled=False),
                     ray=FakeRay())
    routes = _routes(app)
    app.state.store.close()
    return routes


ROUTES = _app_routes()


def test_every_route_is_listed():
    paths = {p for _, p in ROUTES}
    assert {"/v1/jobs", "/v1/jobs/abc123", "/v1/jobs/abc123/logs", "/v1/jobs/abc123/cancel", "/v1/cluster",
            "/metrics", "/openapi.json"} <= paths


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz", "Bearer "])
def test_every_route_but_healthz_needs_the_token(client, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    r = client.request(method, path, headers=headers, json={"spec": {}})
    assert r.status_code == 401, (method, path, r.status_code)
    assert r.headers["www-authenticate"] == "Bearer"


def test_unauthenticated_malformed_body_and_unknown_path_are_401(client):
    assert client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 401
    assert client.get("/v2/secret").status_code == 401


def test_healthz_needs_no_token(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_openapi_declares_bearer_and_versioned_paths(client):
    doc = client.get("/openapi.json", headers=AUTH).json()
    assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())
    assert all(p.startswith("/v1/") or p in ("/healthz", "/metrics") for p in doc["paths"])


@pytest.mark.parametrize(("spec", "loc"), [
    ({"train": {"steps": 0}}, ["body", "spec", "train", "steps"]),
    ({"train": {"stepz": 3}}, ["body", "spec", "train", "stepz"]),
    ({"resources": {"device": "tpu"}}, ["body", "spec", "resources", "device"]),
    ({"name": "x; rm -rf /"}, ["body", "spec", "name"]),
])
def test_malformed_spec_is_422_naming_the_field_and_stores_nothing(client, app, spec, loc):
    r = client.post("/v1/jobs", json={"spec": spec}, headers=AUTH)
    assert r.status_code == 422
    assert loc in [e["loc"] for e in r.json()["detail"]]
    assert app.state.store.jobs.list()[1] == 0


def strict_json(response: httpx.Response):
    """The body as RFC 8259 JSON: UTF-8 without lone surrogates, no NaN or Infinity tokens."""

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(response.content.decode("utf-8"), parse_constant=refuse)


JSON_CT = {**AUTH, "content-type": "application/json"}


# Raw bodies: Python's json decodes these escapes and tokens into values it cannot encode again.
@pytest.mark.parametrize(("raw", "loc"), [
    (rb'{"spec": {"name": "\udfff"}}', ["body", "spec", "name"]),
    (rb'{"spec": {"train": {"lr": NaN}}}', ["body", "spec", "train", "lr"]),
    (rb'{"spec": {"train": {"lr": Infinity}}}', ["body", "spec", "train", "lr"]),
    (rb'{"spec": {"train": {"steps": -Infinity}}}', ["body", "spec", "train", "steps"]),
    (rb'{"spec": {"data": {"val_fraction": 1e999}}}', ["body", "spec", "data", "val_fraction"]),  # overflows
    # Fields that take any string or an unbounded number: rejected before they could be stored.
    (rb'{"spec": {"data": {"source": "/data/\ud800x"}}}', ["body", "spec", "data", "source"]),
    (rb'{"spec": {"data": {"extensions": [".py", "\udc80"]}}}', ["body", "spec", "data", "extensions", 1]),
    (rb'{"spec": {"data": {"max_bytes": NaN}}}', ["body", "spec", "data", "max_bytes"]),
    (rb'{"spec": {}, "max_retries": NaN}', ["body", "max_retries"]),
    (rb'{"spec": {"name": "ok", "extra": [1, {"x": -Infinity}]}}', ["body", "spec", "extra", 1, "x"]),
])
def test_unencodable_json_values_are_422_naming_the_field_and_store_nothing(client, app, raw, loc):
    r = client.post("/v1/jobs", content=raw, headers=JSON_CT)
    assert r.status_code == 422
    assert loc in [e["loc"] for e in strict_json(r)["detail"]]
    assert app.state.store.jobs.list()[1] == 0


def test_a_lone_surrogate_in_a_key_is_422_with_a_printable_location(client):
    r = client.post("/v1/jobs", content=rb'{"spec": {"na\udfffme": "x"}}', headers=JSON_CT)
    assert r.status_code == 422
    [error] = strict_json(r)["detail"]
    assert error["loc"][:2] == ["body", "spec"] and error["loc"][2].startswith("na") and "\ufffd" in error["loc"][2]


def test_a_body_that_is_not_utf8_is_422_at_its_first_bad_byte(client, app):
    """FastAPI answered these with a bare 400 "There was an error parsing the body"."""
    r = client.post("/v1/jobs", content=b'{"kind": "train", "spec": {"name": "\xff"}}', headers=JSON_CT)
    assert r.status_code == 422
    [error] = strict_json(r)["detail"]
    assert error["type"] == "json_invalid" and error["loc"] == ["body", 36] and "0xff" in error["ctx"]["error"]
    assert app.state.store.jobs.list()[1] == 0


def test_the_422_echoes_inputs_only_as_encodable_json(client):
    detail = strict_json(client.post("/v1/jobs", content=rb'{"spec": {"train": {"lr": NaN, "steps": "\udfff"}}}',
                                     headers=JSON_CT))["detail"]
    assert {e["input"] for e in detail} == {"NaN", "\ufffd"}
    # Not JSON at all: the raw bytes are the input, decoded with replacement.
    r = client.post("/v1/jobs", content=b"\xff\xfe{", headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 422 and strict_json(r)["detail"][0]["input"] == "\ufffd\ufffd{"


def test_a_422_lists_a_bounded_number_of_errors(client):
    raw = b'{"spec": {"data": {"extensions": [' + b", ".join([b"NaN"] * 5000) + b"]}}}"
    r = client.post("/v1/jobs", content=raw, headers=JSON_CT)
    assert r.status_code == 422 and len(strict_json(r)["detail"]) == MAX_REPORTED_ERRORS


def test_a_deeply_nested_input_is_422_without_its_echo(client):
    depth = 500  # within json's recursion limit: decoded, then too deep to copy into the error
    r = client.post("/v1/jobs", content=b'{"spec": ' + b"[" * depth + b"]" * depth + b"}", headers=JSON_CT)
    assert r.status_code == 422
    [error] = strict_json(r)["detail"]
    assert error["loc"] == ["body", "spec"] and "input" not in error


def test_stored_non_finite_metrics_and_bad_strings_are_returned_as_json(client, app, fake_ray):
    """Metrics come from the workers' logs (a NaN loss is real) and a spec from before this check
    could hold a lone surrogate: reading such a job is still a 200 in standard JSON."""
    fake_ray.reachable = False  # the controller leaves the job and its metrics alone
    job, _ = app.state.store.jobs.create(kind="train", name="old", spec={"data": {"source": "/d/\udfff"}},
                                         max_retries=0, idempotency_key=None, request_hash=None)
    app.state.store.jobs.set_metrics(job.id, {"loss": float("nan"), "grad_norm": float("inf"), "note": "\ud800"})
    r = client.get(f"/v1/jobs/{job.id}", headers=AUTH)
    assert r.status_code == 200
    body = strict_json(r)
    assert body["metrics"] == {"loss": "NaN", "grad_norm": "Infinity", "note": "\ufffd"}
    assert body["spec"]["data"]["source"] == "/d/\ufffd"
    listed = client.get("/v1/jobs", headers=AUTH)
    assert listed.status_code == 200 and strict_json(listed)["data"][0]["metrics"]["loss"] == "NaN"


def test_bad_control_fields_are_422(client, app):
    for body in ({"spec": {}, "max_retries": 11}, {"spec": {}, "kind": "shell"}, {"spec": {}, "extra": 1}, {}):
        assert client.post("/v1/jobs", json=body, headers=AUTH).status_code == 422, body
    r = client.post("/v1/jobs", json={"spec": {}}, headers={**AUTH, "Idempotency-Key": "has space"})
    assert r.status_code == 422
    assert app.state.store.jobs.list()[1] == 0


def test_body_size_is_limited(client, app):
    big = {"spec": {"name": "x" * (app.state.settings.max_body_bytes + 10)}}
    assert client.post("/v1/jobs", json=big, headers=AUTH).status_code == 413
    assert app.state.store.jobs.list()[1] == 0


def _wait_state(client, job_id, states, deadline_s=DEADLINE_S):
    job: dict = {}

    def reached():
        job.update(client.get(f"/v1/jobs/{job_id}", headers=AUTH).json())
        return job if job["state"] in states else None

    return wait_until(reached, timeout_s=deadline_s, interval_s=POLL_S,
                      what=lambda: f"job {job_id} to reach {states} (it stayed {job.get('state')})")


def test_submit_runs_through_the_controller_to_succeeded(client, fake_ray):
    r = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH)
    assert r.status_code == 202
    body = r.json()
    assert body["state"] == "PENDING" and body["spec"]["train"]["steps"] == 4
    job = _wait_state(client, body["id"], {"SUCCEEDED"})
    assert [h["to_state"] for h in job["history"]] == ["PENDING", "QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert all(h["reason"] for h in job["history"])
    assert job["ray_submission_id"] == f"orch-{body['id']}-1" == job["attempt_history"][0]["ray_submission_id"]
    assert job["metrics"]["loss"] == 1.5
    assert len(fake_ray.submissions) == 1
    listed = client.get("/v1/jobs", params={"state": "SUCCEEDED"}, headers=AUTH).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == body["id"]
    assert client.get("/v1/jobs", params={"state": "RUNNING"}, headers=AUTH).json()["count"] == 0


def test_concurrent_posts_with_one_idempotency_key_make_one_job_and_one_submission(app, fake_ray):
    body = {"spec": TINY_SPEC}
    headers = {**AUTH, "Idempotency-Key": "retry-safe-1"}
    with BackgroundServer(app) as url:
        async def post_all(n):
            async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as c:
                return await asyncio.gather(*(c.post("/v1/jobs", json=body, headers=headers) for _ in range(n)))

        with ThreadPoolExecutor(1) as pool:  # own thread: a browser test may leave this thread's loop running
            responses = pool.submit(asyncio.run, post_all(8)).result()
        assert {r.status_code for r in responses} == {202}
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
        [job_id] = ids
        wait_until(lambda: app.state.store.jobs.get(job_id).state is JobState.SUCCEEDED, timeout_s=DEADLINE_S,
                   interval_s=POLL_S, what=f"job {job_id} to succeed")
    assert app.state.store.jobs.list()[1] == 1
    assert [s["metadata"]["orch_job_id"] for s in fake_ray.submissions] == [job_id]


def test_idempotency_key_with_another_body_is_refused(client, app):
    headers = {**AUTH, "Idempotency-Key": "k-1"}
    assert client.post("/v1/jobs", json={"spec": {"name": "a"}}, headers=headers).status_code == 202
    r = client.post("/v1/jobs", json={"spec": {"name": "b"}}, headers=headers)
    assert r.status_code == 409 and "Idempotency-Key" in r.json()["detail"]
    assert app.state.store.jobs.list()[1] == 1


def test_cancel(client, app, fake_ray):
    fake_ray.auto_run = False
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH).json()["id"]
    _wait_state(client, job_id, {"STARTING"})
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    job = _wait_state(client, job_id, {"CANCELLED"})
    assert fake_ray.stops == [job["ray_submission_id"]]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202  # idempotent
    assert client.post("/v1/jobs/nosuchjob/cancel", headers=AUTH).status_code == 404


def test_cancel_a_finished_job_is_409(client):
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH).json()["id"]
    _wait_state(client, job_id, {"SUCCEEDED"})
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409


def test_unknown_job_is_404(client):
    for path in ("/v1/jobs/nosuchjob", "/v1/jobs/nosuchjob/logs"):
        assert client.get(path, headers=AUTH).status_code == 404


def test_logs_and_follow(client, fake_ray):
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH).json()["id"]
    _wait_state(client, job_id, {"SUCCEEDED"})
    r = client.get(f"/v1/jobs/{job_id}/logs", headers=AUTH)
    assert r.status_code == 200 and "[progress] step=1/1" in r.json()["logs"] and r.json()["attempt"] == 1
    assert r.json()["start"] == 0 and r.json()["end"] == r.json()["size"] > 0 and r.json()["truncated"] is False
    with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, headers=AUTH) as s:
        assert s.headers["content-type"].startswith("text/plain")
        text = "".join(s.iter_text())
    assert "[progress] step=1/1" in text
    assert client.get(f"/v1/jobs/{job_id}/logs", params={"attempt": 7}, headers=AUTH).status_code == 404


def test_follow_of_a_job_that_never_starts_ends_at_the_server_bound(client, app, fake_ray):
    fake_ray.reachable = False  # the job stays PENDING/QUEUED
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH).json()["id"]
    done = threading.Event()

    def follow():
        with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, headers=AUTH) as s:
            "".join(s.iter_text())
        done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert done.wait(app.state.settings.follow_max_s + DEADLINE_S)


def test_cluster(client, app):
    r = client.get("/v1/cluster", headers=AUTH)
    assert r.status_code == 200
    c = r.json()
    assert c["alive_nodes"] == 2 and c["totals"]["CPU"] == 12.0 and c["totals"]["GPU"] == 1.0
    assert c["by_device"]["gpu"]["nodes"] == 1 and c["by_device"]["cpu"]["resources"]["CPU"] == 4.0
    assert all(not k.startswith("node:") for n in c["nodes"] for k in n["resources"])


def test_cluster_unreachable_is_503(client, fake_ray):
    fake_ray.reachable = False
    assert client.get("/v1/cluster", headers=AUTH).status_code == 503


def test_metrics_are_prometheus_text(client):
    client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH)
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'orch_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in r.text
    assert "orch_jobs{state=" in r.text and "orch_reconcile_iterations_total" in r.text


def test_follow_reopens_a_broken_tail_without_repeating_output(client, fake_ray):
    """A tail that breaks while the attempt runs is reopened; what was sent is not sent again."""
    fake_ray.auto_run = False
    job_id = client.post("/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH).json()["id"]
    sid = _wait_state(client, job_id, {"STARTING"})["ray_submission_id"]
    fake_ray.set(sid, "RUNNING")
    calls = []

    async def flaky_tail(submission_id):
        calls.append(submission_id)
        if len(calls) == 1:
            yield "line 1\n"  # then the websocket drops while the job still runs
            return
        fake_ray.set(sid, "SUCCEEDED", exit_code=0)
        yield "line 1\nline 2\n"

    fake_ray.tail = flaky_tail
    with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, headers=AUTH) as s:
        text = "".join(s.iter_text())
    assert text == "line 1\nline 2\n" and len(calls) >= 2
