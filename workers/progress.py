"""One progress-line format, printed by training workers and parsed by the control plane.

A line reads ``[progress] step=20/300 loss=3.2100 tokens_per_s=5400 ...``: ``key=value`` pairs are
readable in a terminal and in ``ray job logs``, and parse back without a second channel. This module
has no torch or Ray import so the control plane can use it.
"""

from __future__ import annotations

import re

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
