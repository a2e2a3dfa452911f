"""Users, teams and what they may see: user tokens, object-level authorization (another team's job is
a 404 on every route that takes a job id), data roots and the audit log, over the real app and a real
database file (fake Ray)."""

from __future__ import annotations

import json
import os
import re
import sqlite3

import pytest
from fastapi.routing import APIRoute

from orchestrator import cli
from orchestrator.auth import Authenticator, Principal, check_data_roots, hash_token, new_token
from orchestrator.store import Store
from tests.support.control_plane import AUTH, TINY_SPEC, TOKEN
from tests.support.servers import BackgroundServer


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _job_routes(routes, prefix=""):
    """Every (method, path) whose path takes a job id, through included routers."""
    for r in routes:
        if isinstance(r, APIRoute) and "{job_id}" in prefix + r.path:
            yield from ((m, prefix + r.path) for m in sorted(r.methods - {"HEAD", "OPTIONS"}))
        elif hasattr(r, "original_router"):
            yield from _job_routes(r.original_router.routes, prefix + r.include_context.prefix)


@pytest.fixture
def users(client, fake_ray):
    """Tokens of alice (team nlp) and carol (team cv); jobs stay QUEUED (Ray unreachable)."""
    fake_ray.reachable = False
    made = {}
    for user, team in (("alice", "nlp"), ("carol", "cv")):
        r = client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH)
        assert r.status_code == 201, r.text
        made[user] = r.json()
    return {u: _bearer(t["token"]) for u, t in made.items()} | {"_records": made}


def _submit(client, headers, **body):
    return client.post("/v1/jobs", json={"spec": TINY_SPEC} | body, headers=headers)


def test_another_teams_job_is_404_on_every_route_that_takes_a_job_id(app, client, users):
    job_id = _submit(client, users["carol"]).json()["id"]
    routes = sorted(set(_job_routes(app.routes)))
    assert {("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/logs"),
            ("POST", "/v1/jobs/{job_id}/cancel")} <= set(routes)
    for method, path in routes:
        url = path.replace("{job_id}", job_id)
        theirs = client.request(method, url, headers=users["alice"])
        missing = client.request(method, path.replace("{job_id}", "nosuchjob"), headers=users["alice"])
        assert theirs.status_code == 404, (method, path, theirs.status_code)
        # The same answer as for a job that does not exist: ids of other teams cannot be probed.
        assert theirs.json()["detail"].replace(job_id, "X") == missing.json()["detail"].replace("nosuchjob", "X")
    assert not app.state.store.jobs.get(job_id).cancel_requested
    for method, path in routes:  # the owner's team and the admin do see it
        for headers in (users["carol"], AUTH):
            r = client.request(method, path.replace("{job_id}", job_id), headers=headers)
            assert r.status_code < 400, (method, path, r.status_code)


def test_a_user_lists_only_its_team_and_the_admin_lists_all(client, users):
    mine = _submit(client, users["alice"]).json()
    _submit(client, users["carol"])
    _submit(client, AUTH)
    listed = client.get("/v1/jobs", headers=users["alice"]).json()
    assert listed["count"] == 1 and [j["id"] for j in listed["data"]] == [mine["id"]]
    assert (mine["team"], mine["owner"], mine["priority"], mine["preemptions"]) == ("nlp", "alice", "normal", 0)
    assert client.get("/v1/jobs", headers=AUTH).json()["count"] == 3
    assert client.get("/v1/jobs", params={"team": "cv"}, headers=AUTH).json()["count"] == 1
    assert client.get("/v1/jobs", params={"team": "cv"}, headers=users["alice"]).status_code == 403
    assert client.get("/v1/jobs", params={"team": "nlp"}, headers=users["alice"]).json()["count"] == 1


def test_team_and_priority_of_a_submission(client, users):
    assert _submit(client, users["alice"], team="cv").status_code == 403
    assert _submit(client, users["alice"], team="nlp", priority="low").json()["priority"] == "low"
    assert client.put("/v1/teams/nlp", json={"max_priority": "high"}, headers=AUTH).status_code == 200
    assert _submit(client, users["alice"], team="nlp", priority="high").json()["priority"] == "high"
    admin_job = _submit(client, AUTH).json()
    assert (admin_job["team"], admin_job["owner"]) == ("admin", "admin")
    assert _submit(client, AUTH, team="cv").json()["team"] == "cv"
    assert _submit(client, users["alice"], priority="urgent").status_code == 422


def test_cancel_own_job_and_the_audit_log_records_who(client, users):
    job_id = _submit(client, users["alice"]).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=users["alice"])
    assert r.status_code == 202 and r.json()["cancel_requested"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=users["alice"])  # a repeat is not a second entry
    _submit(client, users["carol"])
    mine = client.get("/v1/audit", headers=users["alice"]).json()
    assert [(e["actor"], e["action"], e["target"]) for e in mine["data"]] == [
        ("alice", "cancel", job_id), ("alice", "submit", job_id), ("admin", "token.create", users["_records"]["alice"]["id"])]
    assert client.get("/v1/audit", params={"team": "cv"}, headers=users["alice"]).status_code == 403
    everyone = client.get("/v1/audit", headers=AUTH).json()
    assert {e["actor"] for e in everyone["data"]} == {"admin", "alice", "carol"} and everyone["count"] == 5


def test_an_idempotency_key_of_another_user_is_a_conflict_not_their_job(client, users):
    key = {"Idempotency-Key": "same-key"}
    assert _submit(client, {**users["carol"], **key}).status_code == 202
    assert _submit(client, {**users["alice"], **key}).status_code == 409


def test_revoked_token_is_401_at_once(client, app, users):
    token_id = users["_records"]["alice"]["id"]
    assert client.get("/v1/jobs", headers=users["alice"]).status_code == 200  # now cached
    r = client.delete(f"/v1/tokens/{token_id}", headers=AUTH)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = client.get("/v1/jobs", headers=users["alice"])
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers=users["carol"]).status_code == 200
    assert client.delete("/v1/tokens/tok_0000", headers=AUTH).status_code == 404


def test_a_token_is_shown_once_and_only_its_hash_is_stored(client, app, users, settings):
    secret = users["alice"]["Authorization"].removeprefix("Bearer ")
    assert secret.startswith("orch_") and len(secret) >= 40
    listed = client.get("/v1/tokens", headers=AUTH)
    assert secret not in listed.text and all("token" not in t for t in listed.json()["data"])
    assert {t["user"] for t in listed.json()["data"]} == {"alice", "carol"}
    conn = sqlite3.connect(settings.state_dir / "orch.db")
    rows = conn.execute("SELECT * FROM tokens").fetchall()
    conn.close()
    assert secret not in repr(rows) and hash_token(secret) in {r[4] for r in rows}
    for path in (settings.state_dir / "orch.db", settings.state_dir / "orch.db-wal"):
        if path.exists():
            assert secret.encode() not in path.read_bytes()


def test_token_and_team_management_is_admin_only(app, client, users):
    admin_routes = [(m, p) for m, p in _walk_all(app.routes) if p.startswith(("/v1/tokens", "/v1/teams"))]
    assert len(admin_routes) == 6
    for method, path in admin_routes:
        url = re.sub(r"\{[^}]+\}", "nlp", path).replace("/v1/tokens/nlp", "/v1/tokens/tok_00")
        r = client.request(method, url, headers=users["alice"], json={"user": "x", "team": "nlp", "roots": []})
        assert r.status_code == 403, (method, path, r.status_code)
    assert client.post("/v1/tokens", json={"user": "admin", "team": "nlp"}, headers=AUTH).status_code == 422
    assert client.post("/v1/tokens", json={"user": "dan", "team": "admin"}, headers=AUTH).status_code == 422


def _walk_all(routes, prefix=""):
    for r in routes:
        if isinstance(r, APIRoute):
            yield from ((m, prefix + r.path) for m in sorted(r.methods - {"HEAD", "OPTIONS"}))
        elif hasattr(r, "original_router"):
            yield from _walk_all(r.original_router.routes, prefix + r.include_context.prefix)


# -- data roots ------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path, client):
    base = tmp_path / "data"
    for d in ("nlp/corpus", "nlp2", "secret"):
        (base / d).mkdir(parents=True)
    os.symlink(base / "secret", base / "nlp" / "escape")
    r = client.put("/v1/teams/nlp", json={"roots": [str(base / "nlp"), "s3://bucket/nlp"], "quotas": {"gpu": 8}},
                   headers=AUTH)
    assert r.status_code == 200 and r.json()["quotas"] == {"gpu": 8.0}
    return base


@pytest.mark.parametrize(("field", "value"), [
    ("source", "{base}/nlp/escape/file"),  # a symlink out of the root
    ("source", "{base}/nlp/../secret"),  # .. out of the root
    ("path", "{base}/nlp2/shards"),  # a sibling whose name starts like the root
    ("path", "s3://bucket/nlp2/shards"),  # the same, in s3
    ("path", "s3://bucket/nlp/../other"),  # .. out of the s3 prefix
    ("path", "s3://other-bucket/nlp/x"),
    ("source", "relative/dir"),
    ("source", "gs://bucket/nlp"),
])
def test_a_path_outside_the_team_roots_is_422_naming_the_field(client, app, users, roots, field, value):
    spec = TINY_SPEC | {"data": TINY_SPEC["data"] | {field: value.format(base=roots)}}
    r = client.post("/v1/jobs", json={"spec": spec}, headers=users["alice"])
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "spec", "data", field] and error["type"] == "data_root"
    assert app.state.store.jobs.list()[1] == 0
    # The admin is not bound by any team's roots.
    assert client.post("/v1/jobs", json={"spec": spec}, headers=AUTH).status_code == 202


def test_paths_under_the_team_roots_are_accepted(client, users, roots):
    for data in ({"source": f"{roots}/nlp/corpus", "path": "s3://bucket/nlp/shards/v1"},
                 {"source": f"{roots}/nlp/corpus/../corpus"}, {}):
        spec = TINY_SPEC | {"data": TINY_SPEC["data"] | data}
        assert client.post("/v1/jobs", json={"spec": spec}, headers=users["alice"]).status_code == 202, data
    # A team without roots may still run on the defaults (no path fields set), nothing else.
    spec = TINY_SPEC | {"data": TINY_SPEC["data"] | {"source": f"{roots}/nlp/corpus"}}
    assert client.post("/v1/jobs", json={"spec": spec}, headers=users["carol"]).status_code == 422


def test_team_roots_are_validated(client):
    r = client.put("/v1/teams/nlp", json={"roots": ["relative/x"]}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "roots", 0]
    assert client.put("/v1/teams/nlp", json={"roots": ["s3://b/../.."]}, headers=AUTH).status_code == 422


def test_check_data_roots_by_components_and_for_unknown_kinds(tmp_path):
    (tmp_path / "nlp").mkdir()
    roots = [str(tmp_path / "nlp"), "s3://b"]
    assert check_data_roots("train", {"data": {"source": str(tmp_path / "nlp"), "path": "S3://b//x/./y"}}, roots) == []
    assert check_data_roots("train", {"data": {"source": str(tmp_path / "nlp2")}}, roots)[0].startswith("data.source: ")
    assert check_data_roots("train", {"data": {"source": None}}, []) == []
    assert check_data_roots("no-such-kind", {}, roots)[0].startswith("kind: ")
    assert check_data_roots("serve", {"checkpoint": "s3://b/runs/1"}, roots) == []
    assert check_data_roots("prepare", {"source": "s3://b/c", "path": "/elsewhere"}, roots)[0].startswith("path: ")


def test_a_revoke_reaches_another_process_within_its_cache_time(tmp_path):
    """Authenticators over one database stand for API processes: one with a long cache keeps trusting
    its cached lookup until it forgets the token; one without a cache refuses at once."""
    store = Store(f"sqlite:///{tmp_path / 'orch.db'}")
    try:
        secret, token_hash = new_token()
        record = store.tokens.create(user="alice", team="nlp", role="user", token_hash=token_hash, created_by="admin")
        cached, uncached = Authenticator(TOKEN, store, cache_ttl_s=3600.0), Authenticator(TOKEN, store, cache_ttl_s=0.0)
        header = f"Bearer {secret}"
        assert cached.principal(header) == uncached.principal(header) == Principal("alice", "nlp", "user")
        assert cached.principal(f"Bearer {TOKEN}").is_admin and cached.principal("Bearer orch_nope") is None
        store.tokens.revoke(record.id)
        assert uncached.principal(header) is None
        assert cached.principal(header) is not None  # within its cache time
        cached.forget(token_hash)
        assert cached.principal(header) is None
    finally:
        store.close()


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_token_create_prints_it_once_and_it_works(app, monkeypatch, capsys, fake_ray):
    fake_ray.reachable = False
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        assert cli.main(["token", "create", "--user", "alice", "--team", "nlp"]) == 0
        out, err = capsys.readouterr()
        secret = out.strip()
        assert secret.startswith("orch_") and "cannot be shown again" in err
        assert cli.main(["token", "list"]) == 0
        out, _ = capsys.readouterr()
        assert "alice" in out and secret not in out
        assert cli.main(["team", "set", "nlp", "--root", "/data/nlp", "--quota", "gpu=4"]) == 0
        assert "/data/nlp" in capsys.readouterr().out
        monkeypatch.setenv("ORCH_API_TOKEN", secret)
        assert cli.main(["token", "list"]) == 1 and "403" in capsys.readouterr().err
        job = app.state.store.jobs.create(kind="train", name="x", spec={}, max_retries=0, team="nlp", owner="alice")[0]
        assert cli.main(["audit", "--json"]) == 0
        entries = json.loads(capsys.readouterr().out)["data"]
        assert [e["action"] for e in entries] == ["team.set", "token.create"]
        assert cli.main(["list", "--json"]) == 0
        assert [j["id"] for j in json.loads(capsys.readouterr().out)["data"]] == [job.id]
