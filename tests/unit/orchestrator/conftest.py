"""Fixtures shared by the store's and the controller's unit tests (a file may define its own ``env``
for its own setup)."""

from __future__ import annotations

import pytest

from orchestrator.controller.loop import Controller
from orchestrator.ray_client import NodeView
from orchestrator.settings import Settings
from orchestrator.store import Store
from tests.support.control_plane import TOKEN
from tests.support.fakes import FakeRay


@pytest.fixture
def store(tmp_path):
    """A real store on a fresh SQLite file."""
    s = Store(f"sqlite:///{tmp_path / 'orch.db'}")
    yield s
    s.close()


@pytest.fixture
def env(tmp_path):
    """(store, fake Ray, controller, settings): one controller, stepped one reconcile pass at a time."""
    settings = Settings(api_token=TOKEN, state_dir=tmp_path, max_active_jobs=2, metrics_interval_s=0.001)
    store = Store(settings.database_url)
    ray = FakeRay()
    ray.node_list = [NodeView("n1", "127.0.0.1", True, "ALIVE", {"CPU": 16.0})]  # room for 5 default jobs
    yield store, ray, Controller(store, ray, settings), settings
    store.close()
