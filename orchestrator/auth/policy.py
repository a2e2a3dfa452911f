"""Object-level rules: a user sees (and so cancels, follows, ...) only its team's jobs; an admin sees
all. A job the principal may not see is reported exactly like a job that does not exist (404), so that
job ids of other teams cannot be probed. A user submits at most at its team's ``max_priority``."""

from __future__ import annotations

from orchestrator.auth.principals import ADMIN, Principal
from orchestrator.scheduler.views import RANK
from orchestrator.store import JobRecord, TeamRecord


class Forbidden(PermissionError):
    """A valid request the principal may not make (HTTP 403); the message says why."""


def can_see(principal: Principal, job: JobRecord) -> bool:
    return principal.is_admin or job.team == principal.team


def visible_team(principal: Principal, requested: str | None = None) -> str | None:
    """The team filter for listing jobs or audit entries: an admin's choice (None: all teams); a user's
    own team, or Forbidden for another one."""
    if principal.is_admin:
        return requested
    if requested is not None and requested != principal.team:
        raise Forbidden(f"team: you may list only team {principal.team!r}")
    return principal.team


def submission_team(principal: Principal, requested: str | None) -> str:
    """The team a new job belongs to: the submitter's own unless an admin names another. A user naming
    another team is Forbidden (403, not 422: the body is valid, the principal may not do it)."""
    if requested is None or requested == principal.team:
        return principal.team
    if not principal.is_admin:
        raise Forbidden(f"team: you may submit only to your own team {principal.team!r}")
    return requested


def priority_refusal(principal: Principal, team: TeamRecord, priority: str) -> str | None:
    """Why ``principal`` may not submit at ``priority`` for ``team`` (the 403's message), or None.

    A high job preempts every team's lower ones, so the priorities a team may use are an admin's
    grant (``max_priority``, default ``normal``). Admins, and the admin team, are never refused."""
    if principal.is_admin or team.name == ADMIN.team or RANK[priority] <= RANK[team.max_priority]:
        return None
    return (f"priority: team {team.name} may use at most {team.max_priority} (an admin raises it: "
            f"orch team set {team.name} --max-priority {priority})")
