"""The deployment page in headless Chromium: the deployments list, and one deployment's serving
figures (the Grafana serving row's: TTFT, time per output token, queue wait, batch size, tokens/s,
requests by status) per replica, read through the service's stats route from replicas that take
only the service's stats key (tests/support/serving_fakes.py), updating in place."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("playwright", reason="browser tests need Playwright: .venv/bin/pip install playwright")
from playwright.sync_api import expect  # noqa: E402

from orchestrator.api.app import create_app  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.store import DeploymentStatus  # noqa: E402
from tests.browser.conftest import sign_in  # noqa: E402
from tests.support.control_plane import AUTH, TOKEN  # noqa: E402
from tests.support.fakes import FakeRay  # noqa: E402
from tests.support.servers import BackgroundServer  # noqa: E402
from tests.support.serving_fakes import FakeReplicas, figures  # noqa: E402


@pytest.fixture
def serving(tmp_path):
    """(service URL, app, fake replicas): the service (no controller) sending Serve reads to the fakes."""
    replicas = FakeReplicas()
    with BackgroundServer(replicas.app) as serve_url:
        settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", ray_address=None, controller_enabled=False,
                            serve_url=serve_url)
        app = create_app(settings, ray=FakeRay())
        with BackgroundServer(app) as url:
            yield url, app, replicas
        app.state.store.close()


def test_the_deployment_page_shows_each_replicas_serving_figures(serving, watched, tmp_path):
    url, app, replicas = serving
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"format": 1, "step": 10, "model": {}}))
    r = httpx.post(f"{url}/v1/deployments", json={"name": "chat-bot", "spec": {"checkpoint": str(ckpt)}}, headers=AUTH)
    assert r.status_code == 201, r.text
    d = r.json()
    replicas.key_sha256 = d["spec"]["stats_key_sha256"]
    replicas.answers = {"replica-1": figures()}
    page = watched.page
    sign_in(page, url)
    page.click("a[data-page=deployments]")
    page.locator(f"tr[data-id='{d['id']}']").click()
    expect(page.locator("#deployment-name")).to_have_text("chat-bot")
    expect(page.locator("#stats-message")).to_contain_text("QUEUED")  # nothing serves it yet

    app.state.store.deployments.update(d["id"], status=DeploymentStatus.RUNNING, replicas={"RUNNING": 1})
    row = page.locator("#serving-figures tr[data-id='replica-1']")
    expect(row).to_contain_text("12.5 / 30")  # TTFT p50 / p95 ms
    for shown in ("4.25 / 9.5", "1.5 / 6", "2.2", "88.5", "200: 7, 422: 1", "1: 3, 4: 2"):
        assert shown in row.inner_text(), shown
    header = page.inner_text("#serving-figures thead")
    for label in ("TTFT", "Time per output token", "Queue wait", "Mean batch", "Completion tokens/s", "By status"):
        assert label in header

    # New figures update the same row in place.
    page.evaluate("document.querySelector(\"#serving-figures tr[data-id='replica-1']\").__kept = true")
    replicas.answers = {"replica-1": figures(ttft_ms_p50=15.0, requests_by_status={"200": 9, "422": 1})}
    expect(row).to_contain_text("15 / 30")
    assert "200: 9" in row.inner_text()
    assert page.evaluate("document.querySelector(\"#serving-figures tr[data-id='replica-1']\").__kept === true")

    # The replica refusing the service's key (redeployed under another token) is said, figures kept.
    replicas.key_sha256 = "0" * 64
    watched.expected.append("status of 503")
    expect(page.locator("#stats-message")).to_contain_text("stats key")
    expect(row).to_contain_text("15 / 30")
