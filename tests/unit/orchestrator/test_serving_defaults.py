"""A deployment's limits fit the checkpoint it serves (issue #25): ``POST /v1/deployments`` with only
a checkpoint (the demo's 128-token context) stores limits derived from that context, where the
fixed default ``limits.max_tokens`` (256) used to be accepted and then fail every deploy attempt;
a limit set that cannot fit is a 422 at creation naming it, and nothing is stored. The real app
(TestClient, fake Ray, a real sqlite store); seconds."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from tests.bench.serving import write_checkpoint
from tests.support.control_plane import AUTH, TOKEN
from tests.support.fakes import FakeRay
from workers.config import ModelConfig

DEMO_CONTEXT = 128  # tokens, the demo checkpoint's max_seq_len


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", controller_enabled=False,
                              ray_address=None), ray=FakeRay())
    with TestClient(app) as c:
        yield c
    app.state.store.close()


@pytest.fixture
def ckpt(tmp_path) -> str:
    config = ModelConfig(d_model=16, n_layers=1, n_heads=2, expert_hidden=16, max_seq_len=DEMO_CONTEXT)
    return str(write_checkpoint(tmp_path / "demo", config, seed=0))


def test_only_a_checkpoint_gets_limits_derived_from_its_context(client, ckpt):
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": ckpt}}, headers=AUTH)
    assert r.status_code == 201, r.text
    limits = r.json()["spec"]["limits"]
    assert (limits["max_tokens"], limits["default_max_tokens"]) == (DEMO_CONTEXT // 2, 16)
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": ckpt, "limits": {"max_tokens": 100}}},
                    headers=AUTH)
    assert r.status_code == 201 and r.json()["spec"]["limits"]["max_tokens"] == 100  # set and fits: kept


@pytest.mark.parametrize(("limits", "loc", "words"), [
    ({"max_tokens": 256}, ["body", "spec", "limits", "max_tokens"], "below the model's context (128 tokens)"),
    ({"default_max_tokens": 100}, ["body", "spec", "limits", "default_max_tokens"], "derived from the context"),
])
def test_limits_that_cannot_fit_are_a_422_naming_them_and_nothing_is_stored(client, ckpt, limits, loc, words):
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": ckpt, "limits": limits}}, headers=AUTH)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == loc and words in error["msg"]
    assert client.get("/v1/deployments", headers=AUTH).json()["count"] == 0
