"""GET /v1/jobs/{id}/curve: the progress records of every attempt's log, thinned to a bound, with
non-finite figures as null, under the jobs routes' authorization, read as the log grows. Real app and
database, fake Ray. A few seconds."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.api.routes.curves import MAX_CURVE_POINTS, CurvePoint, parse_records, thin
from orchestrator.settings import Settings
from orchestrator.states import JobState
from tests.support.control_plane import AUTH, TINY_SPEC, TOKEN
from tests.support.fakes import FakeRay, progress_line


@pytest.fixture
def fake_ray():
    return FakeRay()


@pytest.fixture
def app(tmp_path, fake_ray):
    app = create_app(Settings(api_token=TOKEN, state_dir=tmp_path / "state", controller_enabled=False), ray=fake_ray)
    yield app
    app.state.store.close()


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def _submitted(app, attempts: int) -> str:
    """A stored job whose ``attempts`` attempts were handed to Ray (the controller's bookkeeping)."""
    store = app.state.store
    job, _ = store.jobs.create(kind="train", name="c", spec=TINY_SPEC, max_retries=3)
    for n in range(1, attempts + 1):
        if n == 1:
            store.jobs.transition(job.id, JobState.QUEUED, "admitted")
        else:
            store.jobs.transition(job.id, JobState.RETRYING, "driver lost")
        store.jobs.transition(job.id, JobState.STARTING, "submitting", new_attempt=True)
        store.jobs.update_attempt(job.id, n, submitted_at=time.time())
    return job.id


def test_points_of_every_attempt_in_log_order(app, client, fake_ray):
    job_id = _submitted(app, 2)
    first, second = (a.submission_id for a in app.state.store.jobs.get(job_id).attempt_records)
    fake_ray.job_logs[first] = "\n".join(["starting", progress_line(1, 8, 3.0), "noise [progress] step=oops",
                                          progress_line(2, 8, 2.5)])
    fake_ray.job_logs[second] = progress_line(2, 8, 2.6) + "\n" + progress_line(3, 8, float("nan"))
    body = client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()
    assert [(p["attempt"], p["step"], p["loss"]) for p in body["points"]] == [(1, 1, 3.0), (1, 2, 2.5), (2, 2, 2.6),
                                                                             (2, 3, None)]
    assert body["total_steps"] == 8 and body["sampled"] is False


def test_a_job_not_yet_submitted_has_an_empty_curve_and_ray_down_is_503(app, client, fake_ray):
    job_id = _submitted(app, 0)
    assert client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()["points"] == []
    started = _submitted(app, 1)
    fake_ray.reachable = False
    assert client.get(f"/v1/jobs/{started}/curve", headers=AUTH).status_code == 503
    assert client.get("/v1/jobs/nosuchjob/curve", headers=AUTH).status_code == 404


def test_another_teams_job_is_404(app, client):
    job_id = _submitted(app, 1)
    token = client.post("/v1/tokens", json={"user": "alice", "team": "nlp"}, headers=AUTH).json()["token"]
    assert client.get(f"/v1/jobs/{job_id}/curve", headers={"Authorization": f"Bearer {token}"}).status_code == 404


def test_a_long_log_is_thinned_to_the_bound_keeping_the_last_point(app, client, fake_ray):
    job_id = _submitted(app, 1)
    steps = 3 * MAX_CURVE_POINTS + 7
    [attempt] = app.state.store.jobs.get(job_id).attempt_records
    fake_ray.job_logs[attempt.submission_id] = "\n".join(progress_line(s, steps, 1.0 + 1 / s) for s in range(1, steps + 1))
    body = client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()
    assert body["sampled"] and len(body["points"]) <= MAX_CURVE_POINTS
    assert body["points"][0]["step"] == 1 and body["points"][-1]["step"] == steps


def _steps(client, job_id) -> list[int]:
    return [p["step"] for p in client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()["points"]]


def test_a_growing_log_adds_its_new_records_and_a_line_being_written_once(app, client, fake_ray):
    """Each poll parses what was appended since the last; a last line without its newline counts
    while it parses, and is not counted twice once it is finished."""
    job_id = _submitted(app, 1)
    [attempt] = app.state.store.jobs.get(job_id).attempt_records
    sid, line = attempt.submission_id, progress_line(2, 8, 2.5)
    fake_ray.job_logs[sid] = progress_line(1, 8, 3.0) + "\n" + line[:len(line) // 2]
    assert _steps(client, job_id) == [1]  # half a record is none
    fake_ray.job_logs[sid] += line[len(line) // 2:]
    assert _steps(client, job_id) == [1, 2]
    fake_ray.job_logs[sid] += "\n" + progress_line(3, 8, 2.0) + "\n"
    assert _steps(client, job_id) == [1, 2, 3]


def test_a_curve_read_over_many_polls_stays_within_the_bound(app, client, fake_ray):
    job_id = _submitted(app, 1)
    [attempt] = app.state.store.jobs.get(job_id).attempt_records
    steps = 3 * MAX_CURVE_POINTS + 7
    fake_ray.job_logs[attempt.submission_id] = ""
    for first in range(1, steps + 1, MAX_CURVE_POINTS // 2):
        fake_ray.job_logs[attempt.submission_id] += "".join(
            progress_line(s, steps, 1.0) + "\n" for s in range(first, min(first + MAX_CURVE_POINTS // 2, steps + 1)))
        shown = _steps(client, job_id)
        assert len(shown) <= MAX_CURVE_POINTS and shown[0] == 1 and shown[-1] == min(first + MAX_CURVE_POINTS // 2 - 1, steps)
    assert shown == sorted(shown) and shown[-1] == steps


def test_thin_and_parse_edge_cases():
    pts = [CurvePoint(attempt=1, step=s, loss=1.0, lr=None, tokens_per_s=None, compression=None, max_vio=None)
           for s in range(10)]
    assert thin(pts, 10) == pts
    assert [p.step for p in thin(pts, 4)] == [0, 4, 8, 9]  # every 4th, and the last
    assert [p.step for p in thin(pts, 2)] == [0, 9]
    assert parse_records("") == [] and parse_records("[progress] step=1/2") == []  # incomplete record
