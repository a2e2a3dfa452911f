"""Principals: who a request acts for. Three roles: ``admin`` (sees and manages everything), ``user``
(sees and cancels its team's jobs; its jobs read and write only under the team's roots) and
``scrape`` (Prometheus: reads ``/metrics``, every team's series, and nothing else)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "admin", "scrape"]
ROLES: tuple[Role, ...] = ("user", "admin", "scrape")
# The only paths a ``scrape`` token may read; anything else is a 403.
SCRAPE_PATHS = frozenset({"/metrics"})
# Actors the service itself writes into the audit log; no user token may carry these names.
RESERVED_USERS = frozenset({"admin", "scheduler", "controller"})


@dataclass(frozen=True)
class Principal:
    user: str
    team: str
    role: Role = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_scraper(self) -> bool:
        return self.role == "scrape"

    @property
    def sees_every_team(self) -> bool:
        """In ``/metrics``: every team's series (admins and scrape tokens), not only its own team's."""
        return self.role in ("admin", "scrape")


# The holder of ORCH_API_TOKEN. Its own jobs belong to team "admin" (and so do jobs stored before teams).
ADMIN = Principal(user="admin", team="admin", role="admin")
