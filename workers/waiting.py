"""One bounded poll: call a check until it holds or a timeout passes.

Every wait in the product and its tests (a server answering /healthz, a Ray head serving its Jobs
API, a job reaching a state, a worker's step loop answering checkpoint-now) is this loop; writing it
once keeps each wait bounded and each timeout message naming what was awaited. It lives in workers/
because that is the one package every other may import; it imports only the standard library, so
the control plane importing it pulls in no worker code (tests/unit/test_boundaries.py holds it to that).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout_s: float, interval_s: float,
               what: str | Callable[[], str], clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``check`` every ``interval_s`` until it returns something truthy, and return that.

    ``check`` runs at least once, and once more at the deadline. After ``timeout_s`` raises
    ``TimeoutError("waited N s for <what>")``; ``what`` may be a callable, evaluated only then, so
    the message can tell the last thing seen. An exception from ``check`` ends the wait: a check that
    knows waiting is hopeless (the awaited process exited) raises.
    """
    deadline = clock() + timeout_s
    while True:
        result = check()
        if result:
            return result
        remaining_s = deadline - clock()
        if remaining_s <= 0:
            description = what() if callable(what) else what
            raise TimeoutError(f"waited {timeout_s:g} s for {description}")
        sleep(min(interval_s, remaining_s))
