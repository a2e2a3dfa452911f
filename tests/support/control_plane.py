"""Fixtures for the control-plane tests: settings in a temp state dir, a fake Ray, the app, a client."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from tests.support.fakes import FakeRay

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_SPEC = {
    "name": "tiny",
    "data": {"max_bytes": 200_000},
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2},
    "train": {"steps": 4, "batch_size": 2, "log_every": 1},
}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.05,
                    metrics_interval_s=0.05, follow_max_s=5.0, ray_address=None)


@pytest.fixture
def fake_ray() -> FakeRay:
    return FakeRay(auto_run=True)


@pytest.fixture
def app(settings, fake_ray):
    app = create_app(settings, ray=fake_ray)
    yield app
    app.state.store.close()


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c
