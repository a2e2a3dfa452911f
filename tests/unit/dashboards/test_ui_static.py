"""/ui: the dashboard's files are served by the app without a token and with a strict CSP, nothing
else gets past the token guard through the prefix, and the page's code never builds HTML from
strings. No browser; well under a second."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.api.routes.ui import CONTENT_SECURITY_POLICY, load_assets
from orchestrator.settings import Settings
from tests.support.control_plane import TOKEN
from tests.support.fakes import FakeRay

UI = files("dashboards") / "ui"
MAX_LINES = 400


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", controller_enabled=False), ray=FakeRay())
    with TestClient(app, follow_redirects=False) as c:
        yield c
    app.state.store.close()


def test_the_page_and_its_modules_need_no_token_and_carry_the_policy(client):
    assert client.get("/ui").status_code == 308 and client.get("/ui").headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    for src in re.findall(r'(?:src|href)="([^"#]+)"', page.text):
        asset = client.get(f"/ui/{src}")
        assert asset.status_code == 200, src
        assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")


def test_revalidation_head_and_refusals(client):
    etag = client.get("/ui/app.js").headers["etag"]
    assert client.get("/ui/app.js", headers={"If-None-Match": etag}).status_code == 304
    head = client.head("/ui/app.js")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    assert client.get("/ui/nope.js").status_code == 404
    assert client.get("/ui/../orchestrator/settings.py").status_code in (404, 401)
    assert client.post("/ui/app.js").status_code == 405


@pytest.mark.parametrize("path", ["/uix", "/ui-admin/x", "/v1/jobs", "/metrics"])
def test_only_the_ui_prefix_is_public(client, path):
    assert client.get(path).status_code == 401


def test_every_asset_is_served_and_small():
    served = load_assets()
    on_disk = {p.name for p in UI.iterdir() if p.is_file()}
    assert set(served) == on_disk
    for name, asset in served.items():
        assert asset.body.count(b"\n") < MAX_LINES, name


def test_no_html_from_strings_and_no_inline_script():
    for entry in UI.iterdir():
        text = entry.read_text()
        if entry.name.endswith(".js"):
            # Text goes in as text nodes (dom.js); nothing is parsed as markup or code.
            for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                           "setTimeout(\"", "setInterval(\""):
                assert banned not in text, f"{entry.name} uses {banned}"
        if entry.name.endswith(".html"):
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), "inline script"
            assert not re.search(r"\son[a-z]+=", text), "inline event handler"
            assert "style=" not in text and "<style" not in text
            assert not re.search(r'(?:src|href)="(?:https?:)?//', text), "an asset from another origin"
