"""The replica's figures and key check without Ray: ReplicaFigures (what /v1/stats and Ray's
metrics both get) and the RequireKey middleware in a bare FastAPI app (the stats key opens
/v1/stats only; every answer is counted by route and status). Ray's metrics are a recording
stand-in here; the real export is checked against a scrape in test_serving_openai.py."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from workers.serving import stats
from workers.serving.http import RequireKey
from workers.serving.stats import ReplicaFigures


class Recorded:
    def __init__(self):
        self.calls = []

    def observe(self, value, tags=None):
        self.calls.append(value)

    def inc(self, value=1, tags=None):
        self.calls.append((value, tags))


def _metrics():
    return SimpleNamespace(**{k: Recorded() for k in ("ttft", "tpot", "queue_wait", "batch_rows", "prompt_tokens",
                                                     "completion_tokens", "requests")})


def test_figures_are_percentiles_of_recent_rows_and_rates_of_the_last_minute(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(stats.time, "perf_counter", lambda: clock[0])
    metrics = _metrics()
    f = ReplicaFigures(metrics)
    f.accepted(rows=2, prompt_tokens=30)
    f.batch_started([0.001, 0.003])
    for ms in range(1, 101):
        f.first_token(ms / 1000)
    f.finished(completion_tokens=11, after_first_s=0.05)  # 5 ms per token after the first
    f.finished(completion_tokens=1, after_first_s=0.0)  # one token: no time per output token
    clock[0] += 30
    f.generated(60)
    f.answered("/v1/completions", 200)
    f.answered("/v1/completions", 422)
    f.answered("/v1/models", 200)
    s = f.snapshot()
    assert (s["ttft_ms_p50"], s["ttft_ms_p95"]) == (51.0, 96.0)
    assert s["tpot_ms_p50"] == 5.0 and len(metrics.tpot.calls) == 1
    assert (s["queue_wait_ms_p50"], s["mean_batch_rows"], s["batch_sizes"]) == (3.0, 2.0, {2: 1})
    assert s["requests_by_status"] == {"200": 2, "422": 1} and s["completion_tokens"] == 12
    assert s["completion_tokens_per_s"] == pytest.approx(60 / 30) and s["prompt_tokens_per_s"] == pytest.approx(1.0)
    clock[0] += stats.RATE_WINDOW_S + 1  # a quiet minute: the rates fall to zero, the counts stay
    s = f.snapshot()
    assert s["completion_tokens_per_s"] == 0 and s["prompt_tokens_per_s"] == 0 and s["requests"] == 1
    assert len(metrics.ttft.calls) == 100 and metrics.completion_tokens.calls == [(60, None)]


KEY, STATS_KEY = "the-deployment-key-0123", "the-stats-key-0123"


@pytest.fixture
def app():
    app = FastAPI()
    app.add_middleware(RequireKey)
    app.state.key_sha256 = hashlib.sha256(KEY.encode()).hexdigest()
    app.state.stats_key_sha256 = hashlib.sha256(STATS_KEY.encode()).hexdigest()
    app.state.figures = ReplicaFigures(_metrics())
    app.get("/d/v1/stats")(lambda: {"ok": True})
    app.get("/d/v1/models")(lambda: {"ok": True})
    return app


def test_the_stats_key_opens_stats_only_and_every_answer_is_counted(app):
    c = TestClient(app)
    bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    assert c.get("/d/v1/stats", headers=bearer(STATS_KEY)).status_code == 200
    assert c.get("/d/v1/stats", headers=bearer(KEY)).status_code == 200
    assert c.get("/d/v1/models", headers=bearer(STATS_KEY)).status_code == 401
    assert c.get("/d/v1/models", headers=bearer(KEY)).status_code == 200
    r = c.get("/d/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert app.state.figures.snapshot()["requests_by_status"] == {"200": 3, "401": 2}
    routes = [tags["route"] for _, tags in app.state.figures.metrics.requests.calls]
    assert routes == ["/d/v1/stats", "/d/v1/stats", "other", "/d/v1/models", "other"]
