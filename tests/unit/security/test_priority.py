"""Priorities are an admin's grant (issue #20, point 4): a high job preempts every team's normal ones,
so a team's users may submit at most at the team's ``max_priority`` (default ``normal``), set by an
admin with ``orch team set TEAM --max-priority high``. Two teams with real tokens on the real app and
a real sqlite store file (fake Ray, jobs stay QUEUED)."""

from __future__ import annotations

import json

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from orchestrator import cli
from orchestrator.api.app import create_app
from orchestrator.auth import ADMIN, Principal, priority_refusal
from orchestrator.settings import Settings
from orchestrator.store import Store, TeamRecord
from orchestrator.store.schema import MIGRATIONS_DIR
from tests.support.control_plane import TINY_SPEC
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer

TOKEN = "priority-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALICE = Principal("alice", "nlp")


@pytest.fixture
def app(tmp_path):
    ray = FakeRay(auto_run=True)
    ray.reachable = False  # jobs stay QUEUED
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.05,
                              ray_address=None), ray=ray)
    yield app
    app.state.store.close()


@pytest.fixture
def users(client):
    """Bearer headers of alice (team nlp) and carol (team cv)."""
    made = {}
    for user, team in (("alice", "nlp"), ("carol", "cv")):
        r = client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH)
        assert r.status_code == 201, r.text
        made[user] = {"Authorization": f"Bearer {r.json()['token']}"}
    return made


def _submit(client, headers, route="/v1/jobs", **body):
    return client.post(route, json={"spec": TINY_SPEC} | body, headers=headers)


# -- the rule ----------------------------------------------------------------------------------------


def test_priority_refusal_names_the_limit_and_spares_admins():
    nlp = TeamRecord("nlp")
    assert priority_refusal(ALICE, nlp, "low") is None and priority_refusal(ALICE, nlp, "normal") is None
    assert priority_refusal(ALICE, nlp, "high") == (
        "priority: team nlp may use at most normal (an admin raises it: orch team set nlp --max-priority high)")
    assert "at most low" in priority_refusal(ALICE, TeamRecord("nlp", max_priority="low"), "normal")
    assert priority_refusal(ALICE, TeamRecord("nlp", max_priority="high"), "high") is None
    assert priority_refusal(ADMIN, nlp, "high") is None  # an admin submitting for any team
    assert priority_refusal(Principal("bob", "nlp", "admin"), nlp, "high") is None
    assert priority_refusal(ADMIN, TeamRecord("admin"), "high") is None  # the admin team is unlimited


# -- the API -----------------------------------------------------------------------------------------


def test_a_user_submits_high_only_after_an_admin_raises_the_team_limit(app, client, users):
    """(Needs routes/jobs.py's submit to call ``priority_refusal``.)"""
    store = app.state.store
    for headers, team in ((users["alice"], "nlp"), (users["carol"], "cv")):
        r = _submit(client, headers, priority="high")
        assert r.status_code == 403, r.text
        assert r.json()["detail"] == (f"priority: team {team} may use at most normal "
                                      f"(an admin raises it: orch team set {team} --max-priority high)")
    assert _submit(client, users["alice"], priority="normal").status_code == 202
    assert _submit(client, users["alice"], priority="low").status_code == 202
    assert store.jobs.list()[1] == 2  # nothing stored for the refusals

    r = client.put("/v1/teams/nlp", json={"max_priority": "high"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["max_priority"] == "high"
    assert _submit(client, users["alice"], priority="high").json()["priority"] == "high"
    assert _submit(client, users["carol"], priority="high").status_code == 403  # cv was not raised
    assert _submit(client, AUTH, priority="high", team="cv").json()["priority"] == "high"  # admins: any

    client.put("/v1/teams/nlp", json={"max_priority": "low"}, headers=AUTH)
    assert "at most low" in _submit(client, users["alice"], priority="normal").json()["detail"]
    entries = client.get("/v1/audit", params={"team": "nlp"}, headers=AUTH).json()["data"]
    assert [e["detail"] for e in entries if e["action"] == "team.set"] == [
        '{"max_priority":"low"}', '{"max_priority":"high"}']


def test_a_sweep_takes_the_same_priority_limit(client, users):
    """A sweep is a job of kind sweep, submitted through the same handler: the same 403."""
    space = {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    r = client.post("/v1/sweeps", json={"priority": "high", "spec": {"name": "s", "base": TINY_SPEC, "space": space}},
                    headers=users["alice"])
    assert r.status_code == 403 and "team nlp may use at most normal" in r.json()["detail"], r.text


def test_the_team_limit_is_shown_validated_and_admin_only(client, users):
    assert client.get("/v1/teams/nlp", headers=AUTH).json()["max_priority"] == "normal"  # nobody set it
    r = client.put("/v1/teams/nlp", json={"max_priority": "urgent"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_priority"]
    assert client.put("/v1/teams/nlp", json={"max_priority": "high"}, headers=users["alice"]).status_code == 403
    assert client.get("/v1/teams/nlp", headers=AUTH).json()["max_priority"] == "normal"
    client.put("/v1/teams/nlp", json={"max_priority": "high"}, headers=AUTH)
    client.put("/v1/teams/nlp", json={"quotas": {"gpu": 2}}, headers=AUTH)  # other fields keep it
    assert [t["max_priority"] for t in client.get("/v1/teams", headers=AUTH).json()["data"]] == ["high"]


def test_orch_team_set_max_priority(app, monkeypatch, capsys):
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        assert cli.main(["team", "set", "nlp", "--max-priority", "high"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].split() == ["TEAM", "ROOTS", "QUOTAS", "MAX", "PRIORITY"]
        assert out.splitlines()[-1].split() == ["nlp", "-", "-", "high"]
        assert cli.main(["team", "show", "nlp", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["max_priority"] == "high"
        assert cli.main(["team", "set", "nlp", "--max-priority", "urgent"]) == 2
        assert "max_priority" in capsys.readouterr().err
        assert app.state.store.teams.get("nlp").max_priority == "high"


# -- the store ---------------------------------------------------------------------------------------


def test_teams_from_before_priorities_keep_their_row_and_may_use_normal(tmp_path):
    """Revision 0006 adds ``teams.max_priority``: a team stored at 0005 keeps its roots and gets normal."""
    path = tmp_path / "orch.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
        conn.execute(text("""INSERT INTO teams (name, roots, quotas, updated_at) VALUES ('nlp', '["/d"]', '{}', 0)"""))
    engine.dispose()
    store = Store(f"sqlite:///{path}")
    try:
        assert store.teams.get("nlp") == TeamRecord("nlp", ("/d",), {}, "normal")
    finally:
        store.close()
