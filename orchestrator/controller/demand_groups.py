"""Queued jobs' demand, shown to the Ray autoscaler as pending placement groups.

A job the scheduler holds QUEUED never reaches Ray, so Ray's autoscaler never sees what it needs.
``ray.autoscaler.sdk.request_resources`` is no way to tell it: each call replaces the previous one,
and Train v2's ``AutoscalingCoordinator`` re-sends its own merged request every ~20 s (even an
empty one), overwriting anyone else's. A pending placement group is the public signal that survives
it: the autoscaler (v1 and v2) adds nodes until every pending group fits. So each job that waits
for room gets one group: its kind's bundles (jobs/kinds/: a training job's one per worker, its CPUs
and device, and Ray Data's CPUs) and one for the driver's reservation, PACK strategy (bundles may
land on different nodes, like the job's own); bundles of an exact pool carry a
``bundle_label_selector`` on ``orch.io/pool`` (a bare device needs none: its resource says it).
Elastic jobs ask for their maximum.

Placement groups need a Ray driver connection, which the Jobs SDK (HTTP) cannot give: this module
connects the service process itself with ``ray.init(address=ORCH_RAY_GCS_ADDRESS)``. A driver
rather than a detached actor: the groups are owned by the service process, so Ray removes them when
it dies (no demand outlives the service that queued it); a restarted service recreates them on its
first pass. A group that becomes CREATED has found its room: it is removed at once (it would hold
resources the scheduler is about to give to a job) and the job gets no new one for
``recreate_after_s``; a job admitted or cancelled loses its group before its attempt is submitted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.contracts.demand import Demand
from jobs.contracts.pools import POOL_LABEL, pool_device
from jobs.contracts.ray_private import use_auth_token
from jobs.kinds import Bundle
from orchestrator.settings import Settings

log = logging.getLogger(__name__)
DEMAND_NAMESPACE = "orch-demand"
# How long a job whose group found room waits before it gets a new one (if it still waits then,
# another job took the room; a new group asks the autoscaler again).
RECREATE_AFTER_S = 30.0
# How often the groups are looked at without a new wish (to remove those that found room).
SYNC_INTERVAL_S = 1.0
CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DemandGroup:
    """One queued job's demand as placement-group bundles, with a label selector per bundle."""
    bundles: tuple[tuple[tuple[str, float], ...], ...]
    selectors: tuple[tuple[tuple[str, str], ...], ...]

    @classmethod
    def of(cls, entries: list[tuple[dict[str, float], dict[str, str]]]) -> DemandGroup:
        return cls(tuple(tuple(sorted(b.items())) for b, _ in entries),
                   tuple(tuple(sorted(s.items())) for _, s in entries))


def demand_group(bundles: Iterable[Bundle], driver_resources: Mapping[str, float]) -> DemandGroup:
    """The bundles a job waits for: its kind's (jobs/kinds/), each with the selector of its pool, and
    its driver's reservation in the first bundle's pool. Empty bundles (a serve replica of 0 CPUs) are
    left out; a job that then asks nothing still gets one CPU, as a group needs a bundle."""
    bundles = tuple(bundles)
    entries: list[tuple[dict[str, float], dict[str, str]]] = []
    for bundle in bundles:
        need = {r: float(v) for r, v in bundle.need.items() if v > 0}
        if need:
            entries += [(need, _selector(bundle.pool))] * bundle.count
    driver = {k: float(v) for k, v in driver_resources.items() if v > 0}
    if driver:
        entries.append((driver, _selector(bundles[0].pool)))
    return DemandGroup.of(entries or [({"CPU": 1.0}, _selector(bundles[0].pool))])


def cpu_bundles(demand: Demand) -> tuple[Bundle, ...]:
    """A CPU-only demand (a deployment's replicas, as the scheduler books them) as 1-CPU bundles."""
    return tuple(Bundle(key, {"CPU": 1.0}, max(math.ceil(need.get("CPU", 0.0)), 1))
                 for key, need in demand.items())


def _selector(pool: str) -> dict[str, str]:
    return {} if pool == pool_device(pool) else {POOL_LABEL: pool}


class DemandSink(Protocol):
    def publish(self, waiting: Mapping[str, DemandGroup]) -> None:
        """Show exactly these waiting jobs' demand (job id -> group); withdraw every other job's."""

    def close(self) -> None: ...


class NoDemand:
    """No autoscaler to tell (``ORCH_RAY_GCS_ADDRESS`` unset): publishing does nothing."""

    def publish(self, waiting: Mapping[str, DemandGroup]) -> None:
        return None

    def close(self) -> None:
        return None


class PlacementGroupDemand:
    """``DemandSink`` over pending placement groups, through a Ray driver in this process. A thread of
    its own connects and syncs the groups: ``ray.init`` may block for a minute while the GCS is away,
    and the reconcile pass must not wait for it; ``publish`` only hands over the latest wish."""

    def __init__(self, gcs_address: str, auth_token: str | None = None,
                 recreate_after_s: float = RECREATE_AFTER_S, sync_interval_s: float = SYNC_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.gcs_address = gcs_address
        self.auth_token = auth_token
        self.recreate_after_s = recreate_after_s
        self.sync_interval_s = sync_interval_s
        self.clock = clock
        self._wanted: dict[str, DemandGroup] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._groups: dict[str, tuple[DemandGroup, Any]] = {}  # job id -> (what it asks, its group)
        self._found_room: dict[str, float] = {}  # job id -> when its group was CREATED
        self._warned = False

    def publish(self, waiting: Mapping[str, DemandGroup]) -> None:
        with self._lock:
            self._wanted = dict(waiting)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="orch-demand", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            with self._lock:
                wanted = dict(self._wanted)
            try:
                self._connect()
                self._sync(wanted)
                self._warned = False
            except Exception as e:  # noqa: BLE001 - demand is advisory: log once, try again next time
                if not self._warned:
                    log.warning("cannot publish queued demand to Ray at %s: %s", self.gcs_address, e)
                self._warned = True
            self._wake.wait(self.sync_interval_s)  # also to notice groups that found room
        self._release()

    def _sync(self, waiting: Mapping[str, DemandGroup]) -> None:
        from ray.util import placement_group, placement_group_table, remove_placement_group

        now = self.clock()
        for job_id in list(self._found_room):
            if job_id not in waiting or now - self._found_room[job_id] >= self.recreate_after_s:
                del self._found_room[job_id]
        for job_id, (asked, group) in list(self._groups.items()):
            created = placement_group_table(group).get("state") == "CREATED"
            if created or waiting.get(job_id) != asked:
                remove_placement_group(group)
                del self._groups[job_id]
                if created:
                    self._found_room[job_id] = now
                    log.info("job %s: its demand group found room; removed", job_id)
        for job_id, asked in waiting.items():
            if job_id in self._groups or job_id in self._found_room:
                continue
            bundles = [dict(b) for b in asked.bundles]
            selectors = [dict(s) for s in asked.selectors]
            group = placement_group(bundles, strategy="PACK", name=f"orch-demand-{job_id}",
                                    bundle_label_selector=selectors if any(selectors) else None)
            self._groups[job_id] = (asked, group)
            log.info("job %s waits for room: demand group of %d bundles", job_id, len(bundles))

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.auth_token:
            use_auth_token(self.auth_token)
        self._groups.clear()
        ray.init(address=self.gcs_address, namespace=DEMAND_NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING)

    def _release(self) -> None:
        """Remove every group and disconnect (the groups would go with this process anyway)."""
        import ray

        if not ray.is_initialized():
            return
        from ray.util import remove_placement_group

        for _, group in self._groups.values():
            try:
                remove_placement_group(group)
            except Exception as e:  # noqa: BLE001 - the driver's exit removes it regardless
                log.info("removing a demand group: %s", e)
        self._groups.clear()
        ray.shutdown()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


def demand_sink(settings: Settings) -> DemandSink:
    """Placement groups through a driver at ``ORCH_RAY_GCS_ADDRESS``, or nothing when it is unset."""
    if not settings.ray_gcs_address:
        return NoDemand()
    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    return PlacementGroupDemand(settings.ray_gcs_address, auth_token=token)
