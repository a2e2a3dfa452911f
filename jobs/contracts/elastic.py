"""A training job's size: the bounds a resize must stay within, and the spec at a new size
(torch- and ray-free: the control plane checks a ``PATCH /v1/jobs/{id}`` with it).

Bounds:
- an elastic job (``resources.num_workers`` a ``[min, max]`` pair) may be resized within its pair;
- a fixed-size job (an int) from ``resources.expert_parallel`` (the smallest group that holds every
  expert) to a ceiling the caller gives: the control plane passes the largest size the job's pool can
  ever hold (its nodes plus what the autoscaler may add, ``orchestrator.scheduler``), or, before it has
  seen the cluster, the spec's own limit ``SPEC_MAX_WORKERS``.
Every size is a multiple of ``expert_parallel`` (experts are sharded over groups of that many workers).

A resize pins the size: an elastic job resized to N runs at N workers from then on. A job spanning
pools (``resources.pools``) is resized by new counts for the same pools; its total obeys the same
bounds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from jobs.specs.train import TrainSpec

# ResourcesSpec.num_workers' own upper bound (jobs/specs/train.py).
SPEC_MAX_WORKERS = 4096


class ResizeError(ValueError):
    """A size the job cannot take; ``field`` names the request field (``num_workers`` or ``pools``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def size_bounds(spec: TrainSpec, ceiling: int | None = None) -> tuple[int, int]:
    """The smallest and largest worker count ``spec``'s job may run at (see the module docstring);
    ``ceiling`` caps a fixed-size job's maximum (default: ``SPEC_MAX_WORKERS``)."""
    size: Any = spec.resources.num_workers
    if isinstance(size, (tuple, list)):
        low, high = (int(v) for v in size)
        return low, high
    ep = spec.resources.expert_parallel
    high = SPEC_MAX_WORKERS if ceiling is None else min(ceiling, SPEC_MAX_WORKERS)
    return ep, max(high - high % ep, ep)


def check_size(spec: TrainSpec, total: int, bounds: tuple[int, int], field: str = "num_workers") -> None:
    """``ResizeError`` unless ``total`` workers is within ``bounds`` and a multiple of expert_parallel."""
    low, high = bounds
    ep = spec.resources.expert_parallel
    if total % ep:
        raise ResizeError(field, f"{total} workers is not a multiple of resources.expert_parallel ({ep})")
    if not low <= total <= high:
        raise ResizeError(field, f"{total} workers is out of range: this job runs on {low} to {high} workers")


def resized(raw: Mapping[str, Any], spec: TrainSpec, *, num_workers: int | None = None,
            pools: Mapping[str, int] | None = None) -> tuple[dict[str, Any], int]:
    """The stored spec ``raw`` (validated as ``spec``) at a new size, and its total worker count.
    Exactly one of ``num_workers`` (a job on one pool) and ``pools`` (new counts for the pools the job
    spans, the same pools) is given; ``ResizeError`` names the field otherwise."""
    if (num_workers is None) == (pools is None):
        raise ResizeError("num_workers", "give num_workers or pools (new worker counts per pool), not both")
    out = copy.deepcopy(dict(raw))
    resources = out.setdefault("resources", {})
    current = spec.resources.pools
    if pools is not None:
        if not current:
            raise ResizeError("pools", f"this job runs on one pool ({spec.resources.device}): give num_workers")
        if set(pools) != set(current):
            raise ResizeError("pools", f"a resize changes counts, not pools: this job runs on {', '.join(sorted(current))}")
        total = sum(pools.values())
        resources["pools"] = dict(pools)
    else:
        if current:
            raise ResizeError("num_workers", f"this job spans pools ({', '.join(sorted(current))}): give new counts "
                                             "as pools")
        total = int(num_workers)
    resources["num_workers"] = total
    return out, total


def describe_size(raw: Mapping[str, Any]) -> str:
    """A stored spec's size in words: ``2 workers`` or ``3 workers (cpu-a: 2, cpu-b: 1)``."""
    resources = raw.get("resources") or {}
    pools = resources.get("pools")
    size = resources.get("num_workers", sum(pools.values()) if pools else 2)
    text = f"{size[0]}-{size[1]} workers" if isinstance(size, (list, tuple)) else \
        f"{size} worker{'' if size == 1 else 's'}"
    return text + (f" ({', '.join(f'{p}: {n}' for p, n in sorted(pools.items()))})" if pools else "")
