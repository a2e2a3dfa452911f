"""dashboards/grafana/orch.json names only metrics that exist: the service's in a real scrape of
/metrics (with a RUNNING job reporting progress and two QUEUED behind it, so the per-job and queue
series are there), Ray's in the dashboards the installed Ray ships, and the serving replicas' own
(``ray_serving_*``, workers/serving/metrics.py) among those the replicas export; that every one of
those reaches a real scrape of Ray's metrics agent is tests/integration/serving/test_serving_openai.py's to show (it
needs Serve running). About 3 s."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import ray.dashboard.modules.metrics.dashboards as ray_dashboards
from prometheus_client.parser import text_string_to_metric_families

from tests.support.control_plane import AUTH, TINY_SPEC
from tests.support.fakes import progress_line
from workers.serving.metrics import EXPORTED as SERVING_EXPORTED
from workers.waiting import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "orch.json"
METRIC = re.compile(r"\b((?:orch|ray)_[a-z0-9_]+)\b")
# A job filling the fake cluster's CPU pool (4 CPUs on the head), so the next ones queue.
POOL_FILLING = {**TINY_SPEC, "resources": {"num_workers": 1, "cpus_per_worker": 3}}


def _named_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    # Label names (ray_train_run_name) are not metrics: drop selectors and by (...) groupings first.
    return {m for e in exprs for m in METRIC.findall(re.sub(r"\{[^}]*\}|\bby \([^)]*\)", "", e))}


def test_every_service_metric_on_the_dashboard_is_in_a_real_scrape(service, fake_ray):
    url, _ = service
    ids = [httpx.post(f"{url}/v1/jobs", json={"spec": POOL_FILLING}, headers=AUTH).json()["id"] for _ in range(3)]
    wait_until(lambda: fake_ray.submissions, timeout_s=10, interval_s=0.05, what="the first submission")
    sid = fake_ray.submissions[0]["submission_id"]
    fake_ray.job_logs[sid] = progress_line(3, 10, 2.0) + "\n"
    fake_ray.set(sid, "RUNNING")

    def states():
        return sorted(httpx.get(f"{url}/v1/jobs/{i}", headers=AUTH).json()["state"] for i in ids)

    wait_until(lambda: states() == ["QUEUED", "QUEUED", "RUNNING"], timeout_s=10, interval_s=0.05,
               what="one RUNNING job and two QUEUED")

    def scraped() -> set[str]:
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
        return {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    wanted = {m for m in _named_metrics() if m.startswith("orch_")}
    assert {"orch_jobs", "orch_queued_jobs", "orch_http_request_duration_seconds_bucket", "orch_job_loss"} <= wanted
    wait_until(lambda: wanted <= scraped(), timeout_s=10, interval_s=0.1, what="every dashboard metric in /metrics")


def _serving_series(metric: str) -> str:
    """The exported metric a series belongs to (a histogram's _bucket, _sum and _count)."""
    return re.sub(r"_(bucket|sum|count)$", "", metric) if metric not in SERVING_EXPORTED else metric


def serving_metrics_on_the_dashboard() -> set[str]:
    return {m for m in _named_metrics() if m.startswith("ray_serving_")}


def test_every_serving_metric_on_the_dashboard_is_one_the_replicas_export():
    named = {_serving_series(m) for m in serving_metrics_on_the_dashboard()}
    assert {"ray_serving_ttft_seconds", "ray_serving_time_per_output_token_seconds", "ray_serving_queue_wait_seconds",
            "ray_serving_batch_rows", "ray_serving_requests_total"} <= named
    assert named <= set(SERVING_EXPORTED)


def test_every_ray_metric_on_the_dashboard_is_one_ray_exports():
    shipped = "".join(p.read_text() for p in Path(ray_dashboards.__file__).parent.glob("*_panels.py"))
    ray_metrics = {m for m in _named_metrics() if m.startswith("ray_") and not m.startswith("ray_serving_")}
    assert ray_metrics, "the dashboard shows none of Ray's metrics"
    assert not {m for m in ray_metrics if not re.search(rf"\b{m}\b", shipped)}
