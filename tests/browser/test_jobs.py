"""The dashboard in headless Chromium against the real service (fake Ray): sign in, the jobs list,
a job's detail with its live loss curve and log tail, the cluster page, and user-supplied text shown
literally (never run as markup). About 10 s."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("playwright", reason="browser tests need Playwright: .venv/bin/pip install playwright")
from playwright.sync_api import expect  # noqa: E402

from tests.browser.conftest import UI_TIMEOUT_MS, sign_in
from tests.support.control_plane import AUTH, TINY_SPEC
from tests.support.fakes import progress_line
from workers.waiting import wait_until  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"
STEPS = 30


def _running_job(url, fake_ray, spec, log_tail=""):
    """A job the controller submitted and fake Ray runs, with STEPS progress lines in its log."""
    r = httpx.post(f"{url}/v1/jobs", json={"spec": spec}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    wait_until(lambda: any(s["metadata"].get("orch_job_id") == job["id"] or job["id"] in s["submission_id"]
                           for s in fake_ray.submissions), timeout_s=10, interval_s=0.05, what="the submission")
    sid = next(s["submission_id"] for s in fake_ray.submissions if job["id"] in s["submission_id"])
    fake_ray.job_logs[sid] = "".join(progress_line(s, STEPS, 4.0 - s * 0.05) + "\n" for s in range(1, STEPS + 1)) + log_tail
    fake_ray.set(sid, "RUNNING")
    return job


def test_sign_in_jobs_list_detail_curve_and_cluster(service, fake_ray, watched):
    url, _ = service
    job = _running_job(url, fake_ray, TINY_SPEC)
    page = watched.page
    watched.expected.append("status of 401")  # the wrong token's refusal

    page.goto(f"{url}/ui/")
    page.fill("#token", "not-the-token-0123456789")
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#sign-in-error")).to_contain_text("invalid token")

    sign_in(page, url)
    row = page.locator(f"tr[data-id='{job['id']}']")
    row.wait_for()
    expect(row).to_contain_text("RUNNING")
    assert "tiny" in row.inner_text() and f"{STEPS}/{STEPS}" in row.inner_text()

    row.click()
    page.wait_for_selector("#job-name")
    assert page.inner_text("#job-name") == "tiny"
    # The curve: one series of every progress record of attempt 1.
    series = page.locator("svg.chart g[data-series='attempt 1']")
    series.wait_for()
    assert series.get_attribute("data-points") == str(STEPS)
    expect(page.locator("#logs")).to_contain_text(f"step={STEPS}/{STEPS}")

    page.click("a[data-page=cluster]")
    page.wait_for_selector("#nodes tr[data-id='n2']")
    assert "GPU 1" in page.inner_text("#nodes")
    assert page.locator("#pools tbody tr").count() >= 1


def test_user_text_is_shown_literally_never_run(service, fake_ray, watched):
    url, _ = service
    # The job name's pattern refuses markup: nothing is stored.
    refused = httpx.post(f"{url}/v1/jobs", json={"spec": {**TINY_SPEC, "name": XSS}}, headers=AUTH)
    assert refused.status_code == 422
    # Free text that is stored and shown: a data path in the spec, and the driver's log.
    spec = {**TINY_SPEC, "data": {**TINY_SPEC["data"], "source": f"/data/{XSS}"}}
    job = _running_job(url, fake_ray, spec, log_tail=f"Traceback: bad file {XSS}\n")
    page = watched.page
    sign_in(page, url)
    page.goto(f"{url}/ui/#/jobs/{job['id']}")
    expect(page.locator("#logs")).to_contain_text("bad file")
    page.click("details.card > summary")
    assert XSS in page.inner_text("#logs")
    assert f"/data/{XSS}" in page.inner_text("#spec")
    assert page.locator("img").count() == 0  # parsed as markup it would be an <img> element
    page.wait_for_timeout(500)  # an onerror would fire as the broken image fails to load
    assert watched.dialogs == []


def test_the_page_holds_no_data_without_a_token(service, watched):
    """The static page loads without a token; everything it shows comes from routes that need one."""
    url, _ = service
    page = watched.page
    watched.expected.append("status of 401")
    page.goto(f"{url}/ui/")
    page.wait_for_selector("#sign-in:not([hidden])", timeout=UI_TIMEOUT_MS)
    for path in ("/v1/jobs", "/v1/cluster", "/v1/sweeps", "/metrics", "/openapi.json"):
        assert page.evaluate(f"fetch('{path}').then(r => r.status)") == 401, path
