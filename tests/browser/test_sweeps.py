"""The sweep pages in headless Chromium.

The form built from the API's schema launches a sweep (validation messages at their fields) against
a service without a controller. Then one real sweep (tests/support/sweeps.py: 3 trials of real training, the
run tests/integration/sweeps/test_sweep_run.py reads too, once per session) is watched through a service whose
controller runs its job on fake Ray: first its files as they stood when its driver was killed
mid-sweep (one trial stopped, another running: its stop button writes the stop request), then its
finished files: one STOPPED and two SUCCEEDED trials, a trial's curve, and the best trial promoted
to a deployment (its key shown once; a refused name and a taken one show the API's error at the
button). Ray Serve is not started: the promote route only stores the deployment, and the reconciler
that deploys it needs a cluster (tests/integration/serving/test_deployments.py serves a promoted sweep).
The real sweep is tests/support/sweeps.py's (2.5-3 minutes on 2 cores, far longer when they are shared; once
per session, whichever module needs it first); the two browser tests take about 10 s.
"""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

pytest.importorskip("playwright", reason="browser tests need Playwright: .venv/bin/pip install playwright")
from playwright.sync_api import expect  # noqa: E402

from jobs.contracts.sweep_events import EVENTS_FILE, stop_requested  # noqa: E402
from jobs.specs.base import apply_override  # noqa: E402
from jobs.specs.serve import key_hash  # noqa: E402
from orchestrator.controller.entrypoints import job_paths  # noqa: E402
from tests.browser.conftest import screenshot, sign_in  # noqa: E402
from tests.support.control_plane import AUTH  # noqa: E402
from tests.support.sweeps import OVERRIDES, SPEC, TRIALS, attach  # noqa: E402
from workers.waiting import wait_until  # noqa: E402

pytest_plugins = ["tests.support.sweeps"]  # the session's one real sweep: the fixture `real_sweep`

XSS = "<img src=x onerror=alert(1)>"
STEPS = 30
SUBMIT_TIMEOUT_S = 10.0


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


def test_launch_a_sweep_from_the_form(idle_service, watched):
    url, app = idle_service
    page = watched.page
    watched.expected.append("status of 422")  # the refused name
    sign_in(page, url)
    page.click("a[data-page=sweeps]")
    _launch(page)
    assert page.inner_text("#sweep-name") == "sweep-ui"
    sweep_id = page.url.rsplit("/", 1)[-1]
    job = app.state.store.jobs.get(sweep_id)
    assert job.kind == "sweep" and job.name == "sweep-ui"
    assert job.spec["trials"] == 3 and job.spec["base"]["train"]["steps"] == STEPS
    assert job.spec["space"]["train.lr"] == {"type": "loguniform", "low": 0.001, "high": 0.01}
    assert job.spec["space"]["compression.density"] == {"type": "choice", "values": [0.01, 0.1]}
    expect(page.locator("tbody tr td.muted")).to_have_text("no trials yet")
    expect(page.locator("#promote")).to_be_disabled()
    expect(page.locator("#promote")).to_have_attribute("title", "the sweep is PENDING: its best trial may still "
                                                                 "change; promote it once it has finished")


def _submitted_sweep(url, fake_ray) -> tuple[str, str]:
    """(sweep id, Ray submission id) of the real run's spec, submitted by the controller to fake Ray."""
    spec = yaml.safe_load(SPEC.read_text())
    for assignment in OVERRIDES:
        apply_override(spec, assignment)
    r = httpx.post(f"{url}/v1/sweeps", json={"spec": spec}, headers=AUTH)
    assert r.status_code == 202, r.text
    sweep_id = r.json()["id"]
    wait_until(lambda: any(sweep_id in s["submission_id"] for s in fake_ray.submissions),
               timeout_s=SUBMIT_TIMEOUT_S, interval_s=0.05, what="the sweep's submission")
    return sweep_id, next(s["submission_id"] for s in fake_ray.submissions if sweep_id in s["submission_id"])


def _badge(page, trial_id: str):
    return page.locator(f"tr[data-id='{trial_id}'] .badge")


@pytest.mark.ray
def test_watch_stop_and_promote_a_real_sweep(real_sweep, service, fake_ray, watched):
    url, app = service
    sweep_id, submission = _submitted_sweep(url, fake_ray)
    fake_ray.set(submission, "RUNNING")
    out = job_paths(app.state.settings.job_root, sweep_id).out
    out.mkdir(parents=True, exist_ok=True)
    # The run's events as they stood when its driver was killed: one trial stopped, one running.
    (out / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in real_sweep.events_at_kill))
    stopped, running = real_sweep.stopped_trial, real_sweep.resumed_trial
    page = watched.page
    watched.expected += ["status of 422", "status of 409"]  # the refused and the taken deployment name
    sign_in(page, url)
    page.goto(f"{url}/ui/#/sweeps/{sweep_id}")
    expect(page.locator("h1 .badge")).to_have_text("RUNNING")
    expect(_badge(page, stopped)).to_have_text("STOPPED")
    expect(_badge(page, running)).to_have_text("RUNNING")
    expect(page.locator(f"button[data-stop='{stopped}']")).to_have_count(0)
    expect(page.locator("#promote")).to_be_disabled()
    expect(page.locator("#promote-why")).to_contain_text("the sweep is RUNNING")
    screenshot(page, "sweep_mid_run")
    page.click(f"button[data-stop='{running}']")
    expect(page.locator(f"tr[data-id='{running}']")).to_contain_text("stop requested")
    assert stop_requested(out, running) and not stop_requested(out, stopped)

    # The whole run's files, and its driver's end: the trials settle, promote opens.
    attach(real_sweep, out)
    fake_ray.set(submission, "SUCCEEDED", exit_code=0)
    expect(page.locator("h1 .badge")).to_have_text("SUCCEEDED")
    summary = real_sweep.summary
    expect(page.locator("tbody tr[data-id]")).to_have_count(TRIALS)
    for trial in summary["trials"]:
        expect(_badge(page, trial["id"])).to_have_text(trial["state"])
    assert sorted(t["state"] for t in summary["trials"]) == ["STOPPED"] + ["SUCCEEDED"] * (TRIALS - 1)
    expect(page.locator("button[data-stop]")).to_have_count(0)
    expect(page.locator("#curves svg g[data-series]")).to_have_count(TRIALS)

    best = summary["best"]["trial_id"]
    shown = httpx.get(f"{url}/v1/sweeps/{sweep_id}", headers=AUTH).json()
    [points] = [len(t["history"]) for t in shown["trials"] if t["id"] == best]
    page.locator(f"tr[data-id='{best}'] td").first.click()
    expect(page.locator(f"#trial-detail svg g[data-series='{best}']")).to_have_attribute("data-points", str(points))
    # Each trial's byte saving (dense / sent: 1 for these one-worker trials, which send nothing).
    assert all(t["compression"] == 1.0 for t in shown["trials"])
    expect(page.locator("th", has_text="dense / sent")).to_have_count(1)
    expect(page.locator("#trial-detail dt", has_text="dense / sent")).to_have_count(1)

    promote = page.locator("#promote")
    expect(promote).to_be_enabled()
    expect(page.locator("#promote-why")).to_contain_text(f"trial {best}")
    page.fill("#promote-name", XSS)  # refused by the API's name pattern: its message, as text
    promote.click()
    expect(page.locator("#promote-error")).to_contain_text("body.name: String should match pattern")
    assert page.locator("#promote-card img").count() == 0 and not page.locator("#promoted").count()
    page.fill("#promote-name", "sweep-best")
    promote.click()
    expect(page.locator("#promoted")).to_contain_text("sweep-best")
    expect(page.locator("#promote-error")).to_have_text("")
    key = page.inner_text("#promoted-key")
    [deployment] = httpx.get(f"{url}/v1/deployments", headers=AUTH).json()["data"]
    assert deployment["name"] == "sweep-best" and deployment["id"] in page.inner_text("#promoted")
    assert deployment["source"] == f"sweep {sweep_id} trial {best}"
    assert deployment["spec"]["key_sha256"] == key_hash(key)  # the key shown is the one that serves
    expect(page.locator("#promoted")).to_contain_text("will not be shown again")
    promote.click()  # the same name again: taken
    expect(page.locator("#promote-error")).to_contain_text("a deployment named 'sweep-best' exists")
    assert page.inner_text("#promoted-key") == key  # a failed promote leaves the key on screen
    screenshot(page, "sweep_promoted")
