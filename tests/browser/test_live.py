"""Live pages update in place (headless Chromium, the real service, fake Ray): a refresh keeps the
rows' DOM nodes, a half-typed filter, the focus and a text selection; a row whose job changes state
is updated in the same node; a hidden tab polls nothing; the state filter's values come from the
API's OpenAPI schema."""

from __future__ import annotations

import re

import httpx
import pytest

pytest.importorskip("playwright", reason="browser tests need Playwright: .venv/bin/pip install playwright")
from playwright.sync_api import expect  # noqa: E402

from tests.browser.conftest import sign_in  # noqa: E402
from tests.support.control_plane import AUTH, TINY_SPEC  # noqa: E402
from workers.waiting import wait_until  # noqa: E402

TWO_REFRESHES_MS = 4500  # the page refreshes every 2 s
ROW = "tr[data-id='{}']"


def _submitted(url, fake_ray) -> tuple[dict, str]:
    r = httpx.post(f"{url}/v1/jobs", json={"spec": TINY_SPEC}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    wait_until(lambda: any(job["id"] in s["submission_id"] for s in fake_ray.submissions), timeout_s=10,
               interval_s=0.05, what="the submission")
    return job, next(s["submission_id"] for s in fake_ray.submissions if job["id"] in s["submission_id"])


def test_a_refresh_keeps_filter_focus_selection_and_row_nodes(service, fake_ray, watched):
    url, _ = service
    job, sid = _submitted(url, fake_ray)
    page = watched.page
    sign_in(page, url)
    row = page.locator(ROW.format(job["id"]))
    row.wait_for()
    page.evaluate(f"document.querySelector(\"{ROW.format(job['id'])}\").__kept = true")

    # Text selected in a cell outlives refreshes.
    page.evaluate(f"""() => {{
      const cell = document.querySelector("{ROW.format(job['id'])} td:nth-child(2)");
      const range = document.createRange(); range.selectNodeContents(cell);
      getSelection().removeAllRanges(); getSelection().addRange(range); }}""")
    page.wait_for_timeout(TWO_REFRESHES_MS)
    assert page.evaluate("getSelection().toString()") == job["id"]

    # A half-typed filter keeps its text and the focus while the job's row changes state in place.
    page.locator("input.filter").click()
    page.keyboard.type("tin")
    fake_ray.set(sid, "RUNNING")
    expect(row).to_contain_text("RUNNING")
    page.wait_for_timeout(TWO_REFRESHES_MS)
    assert page.input_value("input.filter") == "tin"
    assert page.evaluate("document.activeElement.classList.contains('filter')")
    assert page.evaluate(f"document.querySelector(\"{ROW.format(job['id'])}\").__kept === true")
    page.keyboard.type("y")  # the focus is still there: typing goes on
    assert page.input_value("input.filter") == "tiny"


def test_a_hidden_tab_polls_nothing_and_resumes_when_shown(service, fake_ray, watched):
    url, _ = service
    page = watched.page
    sign_in(page, url)
    page.wait_for_selector("table tbody tr")
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/" in r.url else None)

    def visibility(state: str) -> None:
        page.evaluate(f"""() => {{
          Object.defineProperty(document, "visibilityState", {{ value: "{state}", configurable: true }});
          document.dispatchEvent(new Event("visibilitychange")); }}""")

    visibility("hidden")
    page.wait_for_timeout(200)
    asked.clear()
    page.wait_for_timeout(TWO_REFRESHES_MS)
    assert asked == []
    visibility("visible")
    page.wait_for_timeout(500)  # shown again: it refreshes at once, not a period later
    assert any("/v1/jobs" in u for u in asked)


def test_the_state_filter_lists_the_apis_job_states(service, fake_ray, watched):
    url, _ = service
    job, sid = _submitted(url, fake_ray)
    states = httpx.get(f"{url}/openapi.json", headers=AUTH).json()["components"]["schemas"]["JobState"]["enum"]
    page = watched.page
    sign_in(page, url)
    page.locator(ROW.format(job["id"])).wait_for()
    options = page.locator("#state-filter option")
    expect(options).to_have_count(len(states) + 1)
    assert options.all_inner_texts()[1:] == states
    page.select_option("#state-filter", "SUCCEEDED")
    expect(page.locator(ROW.format(job["id"]))).to_have_count(0)
    expect(page.locator("table tbody")).to_contain_text(re.compile("no jobs"))


def test_the_job_page_keeps_the_focus_and_an_open_spec_across_refreshes(service, fake_ray, watched):
    url, _ = service
    job, sid = _submitted(url, fake_ray)
    page = watched.page
    sign_in(page, url)
    fake_ray.set(sid, "RUNNING")
    page.goto(f"{url}/ui/#/jobs/{job['id']}")
    expect(page.locator("#page h1")).to_contain_text("RUNNING")
    page.click("details.card > summary")  # the spec, opened
    page.focus("button.danger")  # Cancel
    page.wait_for_timeout(TWO_REFRESHES_MS)
    assert page.evaluate("document.activeElement.textContent") == "Cancel"
    assert page.evaluate("document.querySelector('details.card').open")
