"""Prometheus instruments of one service instance (own registry, so apps in one process stay apart).

``render()`` is everything (admins and ``scrape`` tokens); ``render_team`` is what a user sees: the
service-wide figures (HTTP traffic, controller passes, the queue and bookings per pool, as
``/v1/cluster`` shows any token), job counts of its team only, and the per-job series (loss,
throughput, ``job_id``) of its team's jobs only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.states import JobState

if TYPE_CHECKING:
    from orchestrator.scheduler.service import Snapshot

# Request latency buckets in seconds: the API answers from the store in about a millisecond.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


CountByState = Callable[..., Mapping[JobState, int]]  # store.jobs.count_by_state(team=None)


class _JobsByState:
    """Collector reading job counts from the store at scrape time (no double bookkeeping); ``team``:
    that team's jobs only."""

    def __init__(self, count_by_state: CountByState, team: str | None = None):
        self._count = count_by_state
        self._team = team

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("orch_jobs", "Jobs in the store by state", labels=["state"])
        counts = self._count() if self._team is None else self._count(team=self._team)
        for state, n in counts.items():
            g.add_metric([JobState(state).value], n)
        yield g


# Per-job training figures exported for RUNNING jobs: metric name -> (job.metrics key, help).
TRAINING_FIGURES = {
    "orch_job_loss": ("loss", "Latest training loss of a RUNNING job"),
    "orch_job_tokens_per_second": ("tokens_per_s", "Training throughput of a RUNNING job"),
    "orch_job_bytes_ratio": ("compression", "Dense gradient bytes / bytes sent so far (compression ratio)"),
}


class _Scheduling:
    """Collector of what the controller's last pass left on its Telemetry: RUNNING jobs' training
    figures (a finished job's series disappear with it) and the queue per pool and priority."""

    def __init__(self, telemetry: Telemetry):
        self._t = telemetry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running: Mapping[str, Mapping[str, Any]] = self._t.running_metrics
        for name, (key, doc) in TRAINING_FIGURES.items():
            g = GaugeMetricFamily(name, doc, labels=["job_id"])
            for job_id, metrics in sorted(running.items()):
                if isinstance(metrics.get(key), int | float):
                    g.add_metric([job_id], float(metrics[key]))
            yield g
        jobs = GaugeMetricFamily("orch_queued_jobs", "QUEUED jobs by the pool (or bare device) their workers ask for and priority",
                                 labels=["pool", "priority"])
        demand = GaugeMetricFamily("orch_queued_demand", "Resources QUEUED jobs ask for, by pool",
                                   labels=["pool", "resource"])
        reserved = GaugeMetricFamily("orch_pool_reserved", "Resources admitted jobs hold by the scheduler's "
                                     "bookkeeping, by pool", labels=["pool", "resource"])
        snap: Snapshot | None = self._t.scheduling
        if snap is not None:
            counts: dict[tuple[str, str], int] = {}
            for view in snap.queued:
                pool = max(view.demand, key=lambda k: len(view.demand[k]))  # the workers' pool, with the device
                counts[(pool, view.priority)] = counts.get((pool, view.priority), 0) + 1
            for (pool, priority), n in sorted(counts.items()):
                jobs.add_metric([pool, priority], n)
            for family, book in ((demand, snap.decisions.queued_demand), (reserved, snap.decisions.reserved)):
                for pool, resources in sorted(book.items()):
                    for resource, amount in sorted(resources.items()):
                        family.add_metric([pool, resource], amount)
        yield from (jobs, demand, reserved)


class _TeamView(Collector):
    """The registry as a user of ``team`` sees it (see the module docstring). ``team_jobs``: ids of
    the team's jobs; a per-job series of any other job is left out (so is one of a job the caller
    did not list: fail closed)."""

    def __init__(self, telemetry: Telemetry, team: str, team_jobs: Collection[str]):
        self._t, self._team, self._jobs = telemetry, team, team_jobs

    def collect(self) -> Iterator[Metric]:
        for family in self._t.registry.collect():
            if family.name == "orch_jobs" and self._t.count_by_state is not None:
                yield from _JobsByState(self._t.count_by_state, self._team).collect()
            elif family.name in TRAINING_FIGURES:
                mine = Metric(family.name, family.documentation, family.type, family.unit)
                mine.samples = [s for s in family.samples if s.labels.get("job_id") in self._jobs]
                yield mine
            else:
                yield family


class Telemetry:
    def __init__(self, count_by_state: CountByState | None = None):
        self.count_by_state = count_by_state
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
        self.preemptions = Counter("orch_job_preemptions", "RUNNING jobs preempted for higher-priority ones",
                                   registry=r)
        # Set by the controller after each pass; read at scrape time by _Scheduling.
        self.running_metrics: dict[str, dict[str, Any]] = {}
        self.scheduling: Snapshot | None = None
        r.register(_Scheduling(self))
        if count_by_state is not None:
            r.register(_JobsByState(count_by_state))

    def render(self) -> bytes:
        """Every series: for admins and ``scrape`` tokens."""
        return generate_latest(self.registry)

    def render_team(self, team: str, team_jobs: Collection[str]) -> bytes:
        """What a user of ``team`` may see; ``team_jobs``: the ids of its team's unfinished jobs."""
        return generate_latest(_TeamView(self, team, team_jobs))
