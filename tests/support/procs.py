"""The Ray Train worker processes of a cluster this process started, and their CPU time, from /proc
(tests/integration/training/test_recovery_speed.py, tests/bench/recovery.py): a CPU-time measure of a job holds on a
shared, loaded machine, where wall-clock step times move with other processes' load."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat counts CPU time in these per second


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process on this machine."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def train_workers() -> list[int]:
    """This process's Ray Train workers: its descendants (a local cluster's raylet is its child)
    titled ``ray::RayTrainWorker``; other clusters on the machine are not ours."""
    parents, ours, found = _parents(), {os.getpid()}, True
    while found:
        found = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                found = True
    workers = []
    for pid in ours:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                workers.append(pid)
        except OSError:
            continue
    return workers


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def workers_cpu() -> dict[int, float]:
    """pid -> CPU seconds of every Ray Train worker of ours."""
    return {pid: s for pid in train_workers() if (s := cpu_s(pid)) is not None}


def cpu_per_step(samples: list[tuple[int, dict[int, float]]], first: int, last: int) -> float:
    """CPU seconds of the workers per step between the samples taken at steps ``first`` and ``last``
    (processes alive at both)."""
    at = dict(samples)
    a, b = at[first], at[last]
    return sum(b[pid] - a[pid] for pid in a.keys() & b.keys()) / (last - first)
