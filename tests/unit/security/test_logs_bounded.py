"""Issue 20 point 5 and point 8: a job's log is never read whole. ``/logs`` answers a bounded tail and
pages back from it, the curve and the controller's progress reads take only what the driver wrote
since their last read, and a follow stream ends by itself. The real app, a real job store, and a real
driver log file read by ``SdkRayJobs`` as on a local head (its ``logs_dir``); Ray itself is never
called (no controller). Under two seconds."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from orchestrator.api.app import create_app
from orchestrator.api.routes.logs import DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES
from orchestrator.controller.observe import PROGRESS_READ_BYTES, AttemptReader
from orchestrator.ray_client import DRIVER_LOG, SdkRayJobs
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.telemetry import Telemetry
from tests.support.control_plane import AUTH, TINY_SPEC, TOKEN
from tests.support.fakes import progress_line

FOLLOW_MAX_S = 1.0
SLACK_S = 5.0  # how much later than its bound a follow stream may end


class LocalHead(SdkRayJobs):
    """``SdkRayJobs`` on a head whose logs folder is ``logs_dir``; its follow tail (a websocket to Ray)
    is a quiet driver: it sends the log once and then nothing, for ever."""

    async def tail(self, submission_id):
        yield (self.logs_dir / DRIVER_LOG.format(submission_id)).read_text()
        await asyncio.sleep(3600)


@pytest.fixture
def logs_dir(tmp_path) -> Path:
    d = tmp_path / "ray-logs"
    d.mkdir()
    return d


@pytest.fixture
def app(tmp_path, logs_dir):
    settings = Settings(api_token=TOKEN, state_dir=tmp_path / "state", controller_enabled=False,
                        follow_max_s=FOLLOW_MAX_S)
    app = create_app(settings, ray=LocalHead("http://127.0.0.1:9", logs_dir=logs_dir))
    yield app
    app.state.store.close()


@pytest.fixture
def bytes_read(monkeypatch) -> list[int]:
    """The size of every positioned read of a file (how ``SdkRayJobs`` reads a driver's log)."""
    reads: list[int] = []
    real = os.pread

    def pread(fd, n, offset):
        data = real(fd, n, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return reads


def _running(app) -> tuple[str, str]:
    """A stored job with one attempt handed to Ray: (job id, its submission id)."""
    store = app.state.store
    job, _ = store.jobs.create(kind="train", name="big", spec=TINY_SPEC, max_retries=0)
    store.jobs.transition(job.id, JobState.QUEUED, "admitted")
    store.jobs.transition(job.id, JobState.STARTING, "submitting", new_attempt=True)
    store.jobs.update_attempt(job.id, 1, submitted_at=time.time())
    store.jobs.transition(job.id, JobState.RUNNING, "running")
    return job.id, store.jobs.get(job.id).attempt_records[0].submission_id


def _log(logs_dir: Path, sid: str) -> Path:
    return logs_dir / DRIVER_LOG.format(sid)


def _lines(first: int, last: int) -> str:
    return "".join(f"line {i:07d} " + "x" * 50 + "\n" for i in range(first, last + 1))


def test_a_log_over_the_default_tail_answers_only_its_tail_marked_truncated(app, client, logs_dir, bytes_read):
    job_id, sid = _running(app)
    text = _lines(1, 3 * DEFAULT_TAIL_BYTES // 60)
    _log(logs_dir, sid).write_text(text)
    body = client.get(f"/v1/jobs/{job_id}/logs", headers=AUTH).json()
    assert body["truncated"] is True and body["size"] == len(text) and body["end"] == len(text)
    assert len(body["logs"]) <= DEFAULT_TAIL_BYTES and body["logs"] == text[body["start"]:]
    assert body["logs"].startswith("line ")  # from a line start, never a cut line
    assert sum(bytes_read) <= DEFAULT_TAIL_BYTES  # the file was not read whole either


def test_paging_back_with_before_returns_the_whole_log_in_order(app, client, logs_dir):
    job_id, sid = _running(app)
    text = _lines(1, 500)
    _log(logs_dir, sid).write_text(text)
    pages, before = [], None
    while True:
        params = {"tail": 4000} | ({"before": before} if before is not None else {})
        body = client.get(f"/v1/jobs/{job_id}/logs", params=params, headers=AUTH).json()
        assert len(body["logs"]) <= 4000 and (before is None or body["end"] == before)
        pages.append(body["logs"])
        if not body["truncated"]:
            break
        before = body["start"]
    assert len(pages) > 5 and "".join(reversed(pages)) == text


@pytest.mark.parametrize("params", [{"tail": 0}, {"tail": MAX_TAIL_BYTES + 1}, {"before": -1}])
def test_an_out_of_range_tail_or_offset_is_422_naming_it(app, client, params):
    job_id, _ = _running(app)
    r = client.get(f"/v1/jobs/{job_id}/logs", params=params, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", next(iter(params))]


def test_the_curves_second_poll_reads_only_what_was_written_since(app, client, logs_dir, bytes_read):
    job_id, sid = _running(app)
    first = "".join(progress_line(s, 100, 5.0 - s / 100) + "\n" for s in range(1, 51)) + "noise\n"
    _log(logs_dir, sid).write_text(first)
    body = client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()
    assert [p["step"] for p in body["points"]] == list(range(1, 51))
    assert sum(bytes_read) == len(first)
    bytes_read.clear()
    more = "".join(progress_line(s, 100, 5.0 - s / 100) + "\n" for s in range(51, 61))
    with _log(logs_dir, sid).open("a") as f:
        f.write(more)
    body = client.get(f"/v1/jobs/{job_id}/curve", headers=AUTH).json()
    assert [p["step"] for p in body["points"]] == list(range(1, 61))
    assert sum(bytes_read) == len(more)  # not the 50 records read before


def test_the_controllers_progress_read_takes_only_new_bytes(app, logs_dir, bytes_read):
    job_id, sid = _running(app)
    store = app.state.store
    log = _log(logs_dir, sid)
    log.write_text(_lines(1, 3 * PROGRESS_READ_BYTES // 60) + progress_line(7, 100, 2.0) + "\n")
    now = [0.0]
    reader = AttemptReader(store, app.state.ray, app.state.settings, Telemetry(store.jobs.count_by_state), lambda: now[0])
    reader.read(store.jobs.get(job_id), sid)
    assert store.jobs.get(job_id).metrics["step"] == 7 and sum(bytes_read) <= PROGRESS_READ_BYTES
    bytes_read.clear()
    new = progress_line(8, 100, 1.5) + "\n"
    with log.open("a") as f:
        f.write(new)
    now[0] += app.state.settings.metrics_interval_s  # the next pass that reads metrics
    reader.read(store.jobs.get(job_id), sid)
    assert store.jobs.get(job_id).metrics["step"] == 8 and sum(bytes_read) == len(new)


def test_a_follow_stream_of_a_quiet_running_job_ends_by_itself(app, client, logs_dir):
    job_id, sid = _running(app)
    text = _lines(1, 2000)
    _log(logs_dir, sid).write_text(text)
    got: list[str] = []
    done = threading.Event()

    def follow():
        with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true", "tail": 1000},
                           headers=AUTH) as s:
            got.append("".join(s.iter_text()))
        done.set()

    started = time.monotonic()
    threading.Thread(target=follow, daemon=True).start()
    assert done.wait(FOLLOW_MAX_S + SLACK_S), "the stream outlived its bound"
    assert time.monotonic() - started >= FOLLOW_MAX_S * 0.9  # held open while the job ran, then ended
    marker, rest = got[0].split("\n", 1)
    assert marker.startswith("[... ") and "earlier bytes of attempt 1 not shown" in marker
    assert len(rest) <= 1000 and text.endswith(rest) and rest.startswith("line ")
