"""``store.teams``, ``store.tokens``, ``store.audit``: who may do what, stored beside the jobs."""

from __future__ import annotations

import pytest

from orchestrator.store import TokenNotFound


def test_teams_are_upserted_and_keep_what_is_not_given(store):
    assert store.teams.all() == {} and store.teams.get("nlp").roots == () and store.teams.get("nlp").max_priority == "normal"
    store.teams.put("nlp", roots=["/data/nlp", "s3://bucket/nlp"])
    store.teams.put("nlp", quotas={"gpu": 8})
    store.teams.put("nlp", max_priority="high")
    nlp = store.teams.all()["nlp"]
    assert nlp.roots == ("/data/nlp", "s3://bucket/nlp") and nlp.quotas == {"gpu": 8.0} and nlp.max_priority == "high"
    assert store.teams.put("nlp", roots=[]).quotas == {"gpu": 8.0}
    assert store.teams.get("nlp").roots == () and store.teams.get("nlp").max_priority == "high"


def test_tokens_are_stored_by_hash_and_revoked(store):
    t = store.tokens.create(user="alice", team="nlp", role="user", token_hash="ab" * 32, created_by="admin")
    assert store.tokens.by_hash("ab" * 32) == t and store.tokens.by_hash("cd" * 32) is None
    revoked, token_hash = store.tokens.revoke(t.id)
    assert revoked.revoked and token_hash == "ab" * 32
    assert store.tokens.revoke(t.id)[0].revoked_at == revoked.revoked_at  # the first time is kept
    assert store.tokens.list() == [] and [x.id for x in store.tokens.list(include_revoked=True)] == [t.id]
    with pytest.raises(TokenNotFound):
        store.tokens.revoke("tok_nope")


def test_audit_log_is_newest_first_and_filters_by_team(store):
    store.audit.record("alice", "submit", "j1", team="nlp")
    store.audit.record("bob", "submit", "j2", team="cv")
    store.audit.record("scheduler", "preempt", "j1", detail="for j3 (high)", team="nlp")
    entries, total = store.audit.list(team="nlp")
    assert total == 2 and [(e.actor, e.action) for e in entries] == [("scheduler", "preempt"), ("alice", "submit")]
    assert entries[0].detail == "for j3 (high)" and entries[0].seq > entries[1].seq
    assert store.audit.list(limit=1, offset=1)[0][0].actor == "bob" and store.audit.list()[1] == 3
