"""The scheduler's view of a job or a serving deployment: who it belongs to, how urgent it is, what it
holds or asks for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jobs.contracts.demand import Demand

Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")
RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class JobView:
    """``demand`` is per pool or device (jobs/contracts/demand.py). ``placement`` maps each demand key to the
    concrete pool it is booked in (admitted jobs only). ``preemptible``: RUNNING, so it can
    checkpoint on request; a job still starting has no checkpoint to resume from. ``slot``: it takes
    one of the ``ORCH_MAX_ACTIVE_JOBS`` slots (a deployment's replicas do not: the limit counts jobs)."""

    id: str
    team: str
    priority: Priority
    submitted_at: float
    demand: Demand
    placement: dict[str, str] = field(default_factory=dict)
    preemptible: bool = False
    slot: bool = True

    @property
    def rank(self) -> int:
        return RANK[self.priority]
