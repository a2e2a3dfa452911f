"""One progress-line format, and the channel that carries a run's progress from rank 0 to the driver.

Rank 0 sends its metrics to the driver (``ProgressChannel``); the driver shows a live bar on a
terminal and otherwise prints each report as a line that reads
``[progress] step=20/300 loss=3.2100 tokens_per_s=5400 ...`` (jobs/display.py). ``key=value`` pairs
are readable in ``ray job logs`` and parse back without a second channel: the control plane reads a
job's progress from its driver's log. This module has no torch or Ray import so the control plane
can use it.
"""

from __future__ import annotations

import re
from typing import Any

PREFIX = "[progress]"
_PAIR = re.compile(r"(\w+)=(\S+)")


def format_progress(metrics: dict[str, float | int | str]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        parts.append(f"{key}={value}")
    return f"{PREFIX} " + " ".join(parts)


def parse_progress(line: str) -> dict[str, float | int | str] | None:
    """The metrics of a progress line (anywhere in ``line``, after any log prefix), else None."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    out: dict[str, float | int | str] = {}
    for key, raw in _PAIR.findall(line[at + len(PREFIX) :]):
        if key == "step" and "/" in raw:
            step, _, total = raw.partition("/")
            out["step"], out["total_steps"] = int(step), int(total)
            continue
        try:
            out[key] = int(raw)
        except ValueError:
            try:
                out[key] = float(raw.rstrip("x"))
            except ValueError:
                out[key] = raw
    return out


# The kinds of event a ProgressChannel sends: (PROGRESS, metrics dict) and (NOTE, one line of text).
PROGRESS, NOTE = "progress", "note"


class ProgressChannel:
    """Rank 0's way to the driver's display: a Ray queue (ray.util.queue.Queue) the driver reads.

    A put is one small actor call every ``log_every`` steps; it does not wait for the other
    workers or for Ray Train's controller, unlike ``ray.train.report``.
    """

    def __init__(self, queue: Any):
        self._queue = queue

    def progress(self, metrics: dict[str, float | int | str]) -> None:
        self._queue.put((PROGRESS, metrics))

    def note(self, text: str) -> None:
        self._queue.put((NOTE, text))
