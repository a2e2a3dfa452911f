"""A run's progress: the typed record rank 0 reports, its one line format, and the channel that
carries it to the driver.

Rank 0 sends a ``ProgressRecord`` every ``log_every`` steps to the driver (``ProgressChannel``); the
driver shows a live bar on a terminal and otherwise prints each record as a line that reads
``[progress] step=20/300 loss=3.21 tokens_per_s=5400 ...`` (jobs/runtime/display.py). ``key=value`` pairs
are readable in ``ray job logs`` and parse back without a second channel: the control plane reads a
job's progress from its driver's log with ``ProgressRecord.from_line``. This module has no torch or
Ray import so the control plane can use it (through jobs/contracts/training.py).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

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
    """The key=value pairs of a progress line (anywhere in ``line``, after any log prefix), else None;
    ``step=a/b`` gives ``step`` and ``total_steps``."""
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


class ProgressRecord(BaseModel):
    """What rank 0 reports every ``log_every`` steps (figures over the steps since the last record,
    byte totals over the run)."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer writer may add fields

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    wire_bytes: int
    dense_bytes: int
    compression: float  # dense bytes / wire bytes so far
    max_vio: float  # the worst layer's MaxVio over the steps since the last record
    drop_frac: float  # the worst layer's dropped share of assignments over those steps
    dense_fallback_buckets: int = 0

    def to_line(self) -> str:
        fields: dict[str, Any] = self.model_dump()
        fields["step"] = f"{fields['step']}/{fields.pop('total_steps')}"
        return format_progress(fields)

    @classmethod
    def from_line(cls, line: str) -> ProgressRecord | None:
        """The record in a log line, or None if the line holds none."""
        parsed = parse_progress(line)
        if not parsed:
            return None
        try:
            return cls.model_validate(parsed)
        except ValueError:
            return None


# The kinds of event a ProgressChannel sends: (PROGRESS, ProgressRecord) and (NOTE, one line of text).
PROGRESS, NOTE = "progress", "note"


class ProgressChannel:
    """Rank 0's way to the driver's display: a Ray queue (ray.util.queue.Queue) the driver reads;
    None (no driver listening, e.g. a run under Tune) drops the events.

    A put is one small actor call every ``log_every`` steps; it does not wait for the other
    workers or for Ray Train's controller, unlike ``ray.train.report``.
    """

    def __init__(self, queue: Any | None):
        self._queue = queue

    def progress(self, record: ProgressRecord) -> None:
        if self._queue is not None:
            self._queue.put((PROGRESS, record))

    def note(self, text: str) -> None:
        if self._queue is not None:
            self._queue.put((NOTE, text))
