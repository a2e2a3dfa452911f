"""Prometheus instruments of one service instance (own registry, so apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from orchestrator.states import JobState

# Request latency buckets in seconds: the API answers from the store in about a millisecond.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _JobsByState:
    """Collector reading job counts from the store at scrape time (no double bookkeeping)."""

    def __init__(self, count_by_state):
        self._count = count_by_state

    def collect(self):
        g = GaugeMetricFamily("orch_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in self._count().items():
            g.add_metric([JobState(state).value], n)
        yield g


class Telemetry:
    def __init__(self, count_by_state=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "orch_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "orch_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.reconciles = Counter("orch_reconcile_iterations", "Controller reconcile passes", registry=r)
        self.reconcile_errors = Counter(
            "orch_reconcile_errors", "Errors while reconciling one job or reaching Ray", ["kind"], registry=r
        )
        self.ray_submissions = Counter("orch_ray_submissions", "Jobs handed to Ray (attempts)", registry=r)
        self.retries = Counter("orch_job_retries", "Attempts started after a lost driver", registry=r)
        self.ray_reachable = Gauge("orch_ray_reachable", "1 when the last reconcile pass reached Ray", registry=r)
        self.jobs_stalled = Gauge(
            "orch_jobs_stalled", "RUNNING jobs with no new progress record for stall_after_s", registry=r
        )
        self.stalls = Counter("orch_job_stalls", "Times a RUNNING job was found stalled", registry=r)
        if count_by_state is not None:
            r.register(_JobsByState(count_by_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
