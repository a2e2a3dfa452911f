"""Who is asking and what they may touch: principals, API tokens, job visibility and data roots.

* ``principals``: ``Principal`` (user, team, role) and the bootstrap admin behind ``ORCH_API_TOKEN``.
* ``tokens``: user tokens (made here, shown once, stored as SHA-256) and ``Authenticator``, which turns
  an ``Authorization`` header into a principal with a small per-process cache.
* ``policy``: which jobs a principal sees, which team a submission lands in and at which priorities.
* ``roots``: ``check_data_roots``, the paths a non-admin's job may read and write, per job kind.

Free of FastAPI: the API (``orchestrator.api.security``), the scheduler and the CLI all use it.
"""

from orchestrator.auth.policy import Forbidden, can_see, priority_refusal, submission_team, visible_team
from orchestrator.auth.principals import (
    ADMIN,
    RESERVED_USERS,
    ROLES,
    SCRAPE_PATHS,
    Principal,
    Role,
)
from orchestrator.auth.roots import (
    check_data_roots,
    root_error,
    root_violations,
)
from orchestrator.auth.tokens import TOKEN_CACHE_MAX_ENTRIES, Authenticator, hash_token, new_token

__all__ = [
    "ADMIN",
    "RESERVED_USERS",
    "ROLES",
    "SCRAPE_PATHS",
    "TOKEN_CACHE_MAX_ENTRIES",
    "Authenticator",
    "Forbidden",
    "Principal",
    "Role",
    "can_see",
    "check_data_roots",
    "hash_token",
    "new_token",
    "priority_refusal",
    "root_error",
    "root_violations",
    "submission_team",
    "visible_team",
]
