"""The three scheduling decisions a cluster operator may want to change, as small injectable objects.

- ``Placement``: which pool of those that fit gets a job's demand (default: best fit, so the largest
  holes stay open for the largest jobs).
- ``QueueOrder``: which queued job goes first (default: priority class, then the team holding the
  least of the job's pools, then submit time).
- ``Preemption``: which running jobs make room for a job that does not fit (default: strictly lower
  priority only, lowest class and newest first, no more jobs than needed).

Each is a Protocol with one method, so a test or a deployment passes its own; the defaults are
frozen dataclasses without state, applied to one pass's snapshot.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from jobs.contracts.demand import Demand, devices
from jobs.contracts.pools import satisfies
from orchestrator.scheduler.pools import candidates, covers
from orchestrator.scheduler.views import JobView

# team -> pool or device -> devices held (GPUs/NPUs in accelerator pools, CPUs in cpu pools)
Usage = Mapping[str, Mapping[str, float]]


class Placement(Protocol):
    def place(self, demand: Demand, free: Mapping[str, Mapping[str, float]]) -> dict[str, str] | None:
        """Demand key -> the pool booked for it, every key in a pool whose free resources cover it
        (two keys in one pool both count); None when some key fits nowhere."""


class QueueOrder(Protocol):
    def order(self, queued: Sequence[JobView], usage: Usage) -> list[JobView]:
        """``queued`` in the order they may take resources; ``usage``: what each team holds now."""


class Preemption(Protocol):
    def victims(self, job: JobView, running: Sequence[JobView],
                fits: Callable[[Sequence[JobView]], bool]) -> list[JobView] | None:
        """Running jobs to stop so that ``job`` fits (``fits(victims)`` says whether it would), or None."""


@dataclass(frozen=True)
class BestFit:
    """Each key into the fitting pool with the least of its device left afterwards (ties: by name)."""

    def place(self, demand: Demand, free: Mapping[str, Mapping[str, float]]) -> dict[str, str] | None:
        left = {p: dict(r) for p, r in free.items()}
        placement = {}
        for key, need in demand.items():
            fitting = [p for p in candidates(left, key) if covers(left[p], need)]
            if not fitting:
                return None
            pool = min(fitting, key=lambda p: (devices(p, left[p]) - devices(p, need), p))
            for k, v in need.items():
                left[pool][k] = left[pool].get(k, 0.0) - v
            placement[key] = pool
        return placement


def share(usage: Mapping[str, float], demand: Demand) -> float:
    """Devices a team holds in the pools ``demand`` asks for (a bare device counts each of its pools)."""
    return sum(v for held, v in usage.items() for key in demand if satisfies(held, key) or satisfies(key, held))


@dataclass(frozen=True)
class PriorityFairOrder:
    """High before normal before low. Within a class, teams take turns: the next job is the oldest of
    the team holding the least of its pools, counting what the jobs already ordered ahead of it will
    hold; so one team's hundred queued jobs do not all go before another team's first. Ties: submit
    time, then id. O(n log teams)."""

    def order(self, queued: Sequence[JobView], usage: Usage) -> list[JobView]:
        by_class: dict[int, dict[str, deque[JobView]]] = defaultdict(lambda: defaultdict(deque))
        for job in sorted(queued, key=lambda j: (j.submitted_at, j.id)):
            by_class[job.rank][job.team].append(job)
        out: list[JobView] = []
        held = {team: defaultdict(float, pools) for team, pools in usage.items()}
        for rank in sorted(by_class, reverse=True):
            teams = by_class[rank]
            heap = [self._entry(held.get(t, {}), q[0]) for t, q in teams.items()]
            heapq.heapify(heap)
            while heap:
                *_, team = heapq.heappop(heap)
                job = teams[team].popleft()
                out.append(job)
                mine = held.setdefault(team, defaultdict(float))
                for key, need in job.demand.items():
                    mine[key] += devices(key, need)
                if teams[team]:
                    heapq.heappush(heap, self._entry(mine, teams[team][0]))
        return out

    @staticmethod
    def _entry(held: Mapping[str, float], job: JobView) -> tuple[float, float, str, str]:
        return share(held, job.demand), job.submitted_at, job.id, job.team


@dataclass(frozen=True)
class LowerPriorityFirst:
    """Only jobs of a strictly lower class, lowest class first and within it the newest (it has lost
    the least work); then any victim not needed once the others are stopped is spared."""

    def victims(self, job: JobView, running: Sequence[JobView],
                fits: Callable[[Sequence[JobView]], bool]) -> list[JobView] | None:
        pool = sorted((r for r in running if r.preemptible and r.rank < job.rank),
                      key=lambda r: (r.rank, -r.submitted_at, r.id))
        chosen: list[JobView] = []
        for r in pool:
            chosen.append(r)
            if fits(chosen):
                break
        else:
            return None
        for r in list(reversed(chosen[:-1])):  # the last one was needed; the earlier may not be
            rest = [c for c in chosen if c is not r]
            if fits(rest):
                chosen = rest
        return chosen
