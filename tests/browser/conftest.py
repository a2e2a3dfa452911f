"""Fixtures for the dashboard's browser tests: the service on a real port (fake Ray, real database
file, controller on), and a headless Chromium page driven by Playwright.

The browser is Debian's ``chromium`` package, launched by path: no ``playwright install`` (which
downloads a browser build). Without either, the browser tests skip, saying how to install them.
Every page fails its test on a console error or a dialog: a Content-Security-Policy violation is a
console error, and an injected script would open the ``alert`` dialog the XSS test sends. Each
test leaves a screenshot under runs/test-artifacts/dashboard/ (``screenshot`` adds one mid-test).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from tests.support.control_plane import TOKEN
from tests.support.fakes import FakeRay
from tests.support.servers import BackgroundServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts" / "dashboard"
# How long a page may take to show what a test waits for (the page refreshes every 2 s).
UI_TIMEOUT_MS = 15_000


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright: .venv/bin/pip install playwright (no `playwright install`: "
                    "the system Chromium is used)")
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("browser tests need Chromium: apt-get install -y chromium")
    return sync_playwright


# Package scope: Playwright's sync API keeps an event loop running on the main thread while it is
# started; stopping it after the last browser test leaves later tests' asyncio.run() free to run.
@pytest.fixture(scope="package")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
                              args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Watched:
    """A page and what went wrong on it: console errors, uncaught exceptions, dialogs."""

    def __init__(self, page):
        self.page = page
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.expected: list[str] = []  # console errors a test provokes on purpose (a refused token's 401)
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("dialog", self._dialog)

    def _console(self, message) -> None:
        if message.type == "error" and not any(e in message.text for e in self.expected):
            self.problems.append(f"console {message.type}: {message.text}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def watched(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    w = Watched(context.new_page())
    yield w
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)  # parametrized ids hold slashes
    w.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    context.close()
    assert not w.dialogs, f"a dialog opened: {w.dialogs}"
    assert not w.problems, w.problems


@pytest.fixture
def fake_ray() -> FakeRay:
    return FakeRay()


def _serve(tmp_path, fake_ray, controller: bool):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", reconcile_interval_s=0.05,
                        metrics_interval_s=0.05, ray_address=None, controller_enabled=controller)
    app = create_app(settings, ray=fake_ray)
    with BackgroundServer(app) as url:
        yield url, app
    app.state.store.close()


@pytest.fixture
def service(tmp_path, fake_ray):
    """(base URL, app) of the service with its controller, on a free loopback port."""
    yield from _serve(tmp_path, fake_ray, controller=True)


@pytest.fixture
def idle_service(tmp_path, fake_ray):
    """The same without a controller: what is submitted is stored and stays PENDING (nothing runs)."""
    yield from _serve(tmp_path, fake_ray, controller=False)


def screenshot(page, name: str) -> None:
    """A screenshot of a moment inside a test (``watched`` takes one at its end), beside the others."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page, url: str, token: str = TOKEN) -> None:
    page.goto(f"{url}/ui/")
    page.fill("#token", token)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#nav:not([hidden])")
