"""The sweep pages in headless Chromium: launch a sweep from the form built from the API's schema
(validation messages at their fields), then watch its trials from the events file its driver
writes (jobs/sweep_events.py): the live table sorts and filters, a trial's curve opens, an
early-stopped trial is marked, a stop button writes the stop request. The service runs without a
controller, so nothing trains. About 10 s."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright", reason="browser tests need Playwright: .venv/bin/pip install playwright")
from playwright.sync_api import expect  # noqa: E402

from jobs.sweep_events import append_event, stop_requested  # noqa: E402
from orchestrator.entrypoints import job_paths  # noqa: E402
from tests.dashboard.conftest import sign_in  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"
STEPS = 30


def _trial(out, tid, lr, density, losses, end_state=None):
    append_event(out, "start", tid, parameters={"train.lr": lr, "compression.density": density})
    for i, loss in enumerate(losses, start=1):
        append_event(out, "result", tid, metrics={"step": i * 10, "loss": loss})
    if end_state:
        append_event(out, "complete", tid, state=end_state)


def _launch(page):
    """Fill the form: name, 3 trials, lr (log-uniform) and density (a choice), 30 steps of base."""
    page.click("#new-sweep")
    form = page.locator("#sweep-form")
    form.wait_for()
    name = page.locator("[data-loc='[\"spec\",\"name\"]']")
    name.fill(XSS)  # refused by the name pattern: the message shows at the field
    page.locator("[data-loc='[\"spec\",\"trials\"]']").fill("3")
    row = page.locator("#space .space-row").first
    row.locator("[data-loc$='\"low\"]']").fill("0.001")
    row.locator("[data-loc$='\"high\"]']").fill("0.01")
    page.click("#space >> text=Add dimension")
    second = page.locator("#space .space-row").nth(1)
    second.locator("[data-loc$='\"path\"]']").fill("compression.density")
    second.locator("select").first.select_option("choice")
    second.locator("[data-loc$='\"values\"]']").fill("0.01, 0.1")
    page.locator("details > summary", has_text="Base training spec").click()
    page.locator("[data-loc='[\"spec\",\"base\",\"train\",\"steps\"]']").fill(str(STEPS))
    page.click("#sweep-form button[type=submit]")
    expect(name.locator("xpath=..").locator(".field-error")).to_contain_text("pattern")
    name.fill("sweep-ui")
    page.click("#sweep-form button[type=submit]")
    page.wait_for_selector("#sweep-name")


def test_launch_watch_compare_and_stop_a_trial(idle_service, watched):
    url, app = idle_service
    page = watched.page
    watched.expected.append("status of 422")  # the refused name
    sign_in(page, url)
    page.click("a[data-page=sweeps]")
    _launch(page)
    assert page.inner_text("#sweep-name") == "sweep-ui"
    sweep_id = page.url.rsplit("/", 1)[-1]
    job = app.state.store.get(sweep_id)
    assert job.kind == "sweep" and job.name == "sweep-ui"
    assert job.spec["trials"] == 3 and job.spec["base"]["train"]["steps"] == STEPS
    assert job.spec["space"]["train.lr"] == {"type": "loguniform", "low": 0.001, "high": 0.01}
    assert job.spec["space"]["compression.density"] == {"type": "choice", "values": [0.01, 0.1]}
    assert watched.dialogs == []

    # The driver's events (as jobs/sweep.py writes them): one done, one early-stopped, one running.
    out = job_paths(app.state.settings.job_root, sweep_id).out
    out.mkdir(parents=True, exist_ok=True)
    _trial(out, "t_00000", 0.003, 0.1, [3.9, 3.1, 2.6], end_state="SUCCEEDED")
    _trial(out, "t_00001", 0.001, 0.01, [4.2], end_state="EARLY_STOPPED")
    _trial(out, "t_00002", 0.008, 0.1, [3.7, 3.0])
    table = page.locator("tbody tr[data-id]")
    expect(table).to_have_count(3)
    expect(page.locator("#curves [data-mark=early-stopped]")).to_have_count(1)
    expect(page.locator("#parallel path[data-series]")).to_have_count(3)
    expect(page.locator("#scatter circle")).to_have_count(3)

    page.click("th[data-key=best_metric]")  # ascending: the best trial first
    expect(table.first).to_have_attribute("data-id", "t_00000")
    page.fill("input.filter", "EARLY")
    expect(table).to_have_count(1)
    page.fill("input.filter", "")

    page.locator("tr[data-id=t_00000] td").first.click()
    expect(page.locator("#trial-detail svg g[data-series=t_00000]")).to_have_attribute("data-points", "3")

    page.click("button[data-stop=t_00002]")
    expect(page.locator("tr[data-id=t_00002]")).to_contain_text("stop requested")
    assert stop_requested(out, "t_00002") and not stop_requested(out, "t_00000")
