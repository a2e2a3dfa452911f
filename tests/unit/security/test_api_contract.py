"""The API keeps its own contract (issue #20, point 8): every 422 answers the documented
``HTTPValidationError`` (a list of ``{loc, msg, type}``, even for a rule a route checks itself),
numbers are strict (``false`` is not a quota), a query parameter no route takes is refused, and a
405's ``Allow`` lists every method of the path. The real app and a real store (fake Ray);
tests/integration/orchestrator/test_fuzz.py runs schemathesis with every check over the same app."""

from __future__ import annotations

import pytest

from orchestrator.api.app import create_app
from orchestrator.api.errors import string_detail_errors
from orchestrator.settings import Settings
from tests.support.control_plane import TINY_SPEC
from tests.support.fakes import FakeRay
from workers.waiting import wait_until

TOKEN = "api-contract-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app(tmp_path):
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.02,
                              ray_address=None), ray=FakeRay())
    yield app
    app.state.store.close()


def _items(r) -> list[dict]:
    """The 422's detail, checked to be the documented list of {loc, msg, type}."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for item in detail:
        assert isinstance(item["loc"], list) and isinstance(item["msg"], str) and isinstance(item["type"], str)
    return detail


def test_string_detail_errors_locate_the_field_the_message_names():
    assert string_detail_errors("user: 'admin' is reserved") == [
        {"type": "value_error", "loc": ["body", "user"], "msg": "'admin' is reserved"}]
    assert string_detail_errors("spec.data.0.source: outside")[0]["loc"] == ["body", "spec", "data", 0, "source"]
    assert string_detail_errors("the job can never run on this cluster: no pool 'gpu'") == [
        {"type": "value_error", "loc": ["body"], "msg": "the job can never run on this cluster: no pool 'gpu'"}]


def test_a_rule_the_route_checks_itself_answers_the_documented_list(client):
    [item] = _items(client.post("/v1/tokens", json={"user": "admin", "team": "nlp"}, headers=AUTH))
    assert item["loc"] == ["body", "user"] and "reserved" in item["msg"]
    [item] = _items(client.post("/v1/tokens", json={"user": "dan", "team": "admin"}, headers=AUTH))
    assert item["loc"] == ["body", "team"]


def test_a_job_that_can_never_fit_is_a_422_list(app, client):
    """The documented list, located at the size that cannot fit (it was a bare string)."""
    wait_until(lambda: app.state.controller.scheduler.snapshot is not None, timeout_s=20, interval_s=0.02,
               what="a scheduling pass")
    spec = {**TINY_SPEC, "resources": {"num_workers": 512}}
    [item] = _items(client.post("/v1/jobs", json={"spec": spec}, headers=AUTH))
    assert item["loc"] == ["body", "spec", "resources"] and item["msg"].startswith("the job can never run on this cluster")
    assert client.get("/v1/jobs", headers=AUTH).json()["count"] == 0


@pytest.mark.parametrize("bad", [False, True, "8", None, [8], -1, 1e7])
def test_a_quota_is_a_number_and_nothing_else(client, bad):
    assert client.put("/v1/teams/nlp", json={"quotas": {"gpu": 4}}, headers=AUTH).json()["quotas"] == {"gpu": 4.0}
    items = _items(client.put("/v1/teams/nlp", json={"quotas": {"gpu": bad}}, headers=AUTH))
    assert {tuple(i["loc"]) for i in items} == {("body", "quotas", "gpu")}
    assert client.get("/v1/teams/nlp", headers=AUTH).json()["quotas"] == {"gpu": 4.0}  # nothing stored


def test_an_integer_quota_is_still_a_number(client):
    assert client.put("/v1/teams/nlp", json={"quotas": {"gpu": 8, "cpu": 0.5}}, headers=AUTH).json()["quotas"] == {
        "gpu": 8.0, "cpu": 0.5}


def test_an_undeclared_or_repeated_query_parameter_is_refused(client):
    [item] = _items(client.get("/v1/jobs", params={"limt": 5}, headers=AUTH))
    assert (item["loc"], item["type"]) == (["query", "limt"], "extra_forbidden")
    [item] = _items(client.get("/v1/jobs?limit=1&limit=2", headers=AUTH))
    assert item["loc"] == ["query", "limit"]
    assert client.get("/v1/jobs?state=QUEUED&state=RUNNING&limit=5", headers=AUTH).status_code == 200  # a list
    assert client.get("/v1/tokens", params={"include_revoked": True}, headers=AUTH).status_code == 200
    assert client.get("/metrics", params={"x": 1}, headers=AUTH).status_code == 422


def test_a_405_allows_every_method_of_the_path(client):
    """(Needs app.py to register errors.http_error_response.)"""
    for path, methods in (("/v1/jobs", {"GET", "POST"}), ("/v1/teams/nlp", {"GET", "PUT"}),
                          ("/v1/tokens", {"GET", "POST"})):
        r = client.request("OPTIONS", path, headers=AUTH)
        assert r.status_code == 405 and methods <= set(r.headers["allow"].split(", ")), (path, r.headers)
