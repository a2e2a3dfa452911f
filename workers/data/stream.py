"""One rank's training rows: the global position (workers/data/order.py) stepped on every rank alike,
and this rank's pieces read through Ray Data, one read task per unit, the next unit fetched while
the current one trains.

``TrainPlan`` is what the driver hands every worker (the canonical units and how to read them);
``RankStream.next(rows)`` returns this rank's ``rows[rank]`` sequences of the step and their ids.

``data.on_corrupt: skip``: a unit whose read task finds it corrupt is dropped by every rank at the
same step (``agree``, a collective the loop passes in: the ranks' finds are merged before the step's
pieces are final), so the ranks' positions stay one; ``fail`` needs no collective: the read task's
error, naming the file, ends the run.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs

from workers.confine import Confinement
from workers.data.cache import DataError
from workers.data.order import QUEUE_PIECES, DataState, Plan, Unit
from workers.data.storage import original_error

Fetch = Callable[[Unit], "np.ndarray | str"]  # a unit's packed rows in stored order, or why it is corrupt


@dataclass(frozen=True)
class TrainPlan:
    """The training split as every worker reads it (picklable: it travels in the loop's config)."""

    units: list[Unit]
    filesystem: pafs.FileSystem
    seq_len: int
    roots: Confinement | None = None
    on_corrupt: Literal["fail", "skip"] = "fail"
    env: dict[str, str] | None = None  # S3 settings for the read tasks' runtime_env

    def stored_bytes(self) -> int:
        return sum(u.stored_bytes for u in self.units)


def ray_fetch(plan: TrainPlan) -> Fetch:
    """Read one unit with a Ray Data read task (workers/data/reader.py ``UnitSource``). Ray Data's
    INFO lines (three per execution, so per unit) are left out of the worker's log; warnings stay.

    The unit's blocks are taken as the execution's block references, not through ``iter_batches``:
    in Ray 2.60 every batch iterator starts a ``WaitBlockPrefetcher`` whose thread only the
    prefetcher's ``__del__`` stops, while that thread (its bound ``_run``) keeps the prefetcher
    alive, so none ever went: one thread per unit read, thousands per epoch of a large set (and the
    process's end at TB scale)."""
    import logging

    import ray
    import ray.data
    from ray.data.block import BlockAccessor

    from workers.data.reader import UnitSource

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def fetch(unit: Unit) -> np.ndarray | str:
        source = UnitSource([unit], plan.filesystem, plan.seq_len, plan.roots,
                            "mark" if plan.on_corrupt == "skip" else "fail")
        ds = ray.data.read_datasource(source, override_num_blocks=1,
                                      runtime_env={"env_vars": plan.env} if plan.env else None)
        parts = []
        try:
            for ref in (ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs):
                batch = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
                if "corrupt" in batch:
                    return str(batch["corrupt"][0])
                parts.append(batch["input_ids"])
        except Exception as e:  # Ray wraps the task's error with the remote traceback: the user needs its line
            from ray.exceptions import RayError

            cause = original_error(e, (DataError,), but=(RayError,))
            if cause is None:
                raise
            raise type(cause)(str(cause)) from None
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    return fetch


class RankStream:
    """This rank's rows, step after step, from the global position ``state``."""

    def __init__(self, plan: TrainPlan, state: DataState, rank: int, fetch: Fetch,
                 agree: Callable[[set[int]], set[int]] | None = None, log: Callable[[str], None] = print):
        self.plan, self.state, self.rank, self.fetch, self.agree, self.log = plan, state, rank, fetch, agree, log
        self._pool = ThreadPoolExecutor(QUEUE_PIECES, thread_name_prefix="unit-fetch")
        self._units: dict[int, Future] = {}  # unit -> its rows (or why it is corrupt), fetched or on the way
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (epoch, unit) -> its row order
        self.read_bytes = 0  # stored bytes of the units this rank fetched
        self.units_read = 0

    def _start(self, unit: int) -> Future:
        if unit not in self._units:
            self._units[unit] = self._pool.submit(self.fetch, self.state.plan.units[unit])
            self.read_bytes += self.state.plan.units[unit].stored_bytes
            self.units_read += 1
        return self._units[unit]

    def _perm(self, plan: Plan, epoch: int, unit: int) -> np.ndarray:
        key = (epoch, unit)
        if key not in self._perms:
            self._perms[key] = plan.row_order(self.state.seed, epoch, unit)
        return self._perms[key]

    def next(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``rows[rank]`` sequences of the next step: (ids in the epoch (rows,),
        (rows, seq_len + 1) uint16). Collective in skip mode (``agree``)."""
        plan = self.state.plan
        while True:
            trial = self.state.copy()
            pieces = trial.step(rows)[self.rank]
            ids, parts, corrupt = [], [], set()
            for p in pieces:
                got = self._start(p.unit).result()
                if isinstance(got, str):
                    corrupt.add(p.unit)
                    continue
                order = self._perm(plan, trial.epoch, p.unit)[p.lo: p.hi]
                ids.append(plan.offsets[p.unit] + order)
                parts.append(got[order])
            if self.agree is not None:
                corrupt |= {u for u, f in self._units.items() if f.done() and isinstance(f.result(), str)}
                corrupt = self.agree(corrupt - self.state.dead) | corrupt
            corrupt -= self.state.dead
            if not corrupt:
                break
            for unit in sorted(corrupt):
                found = self._units.get(unit)
                if found is not None and found.done():
                    self.log(f"data: skipping a corrupt unit: {found.result()}")
                elif self.rank == 0:
                    self.log(f"data: skipping {plan.units[unit].name()}, found corrupt by another worker")
            self.state.mark_dead(corrupt)
        self.state = trial
        keep = {p.unit for p in trial.held[self.rank]}
        for p in trial.held[self.rank]:  # the next piece's unit is fetched while this one trains
            self._start(p.unit)
        for unit in [u for u in self._units if u not in keep]:
            del self._units[unit]
        self._perms = {k: v for k, v in self._perms.items() if k[1] in keep and k[0] == trial.epoch}
        width = plan.seq_len + 1
        x = np.concatenate(parts) if parts else np.empty((0, width), dtype=np.uint16)
        return (np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)), x

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def state_for(plan: TrainPlan, seed: int, meta: dict[str, Any] | None, log: Callable[[str], None] = print) -> DataState:
    """The position to start from: a checkpoint's (``meta``, any world size), or the start."""
    order = Plan(plan.units, plan.seq_len)
    if meta is None:
        return DataState(order, seed)
    saved = meta.get("data_state")
    if saved is not None:
        try:
            return DataState.restore(order, seed, saved)
        except ValueError as e:
            log(f"data: {e}; continuing epoch {meta['epoch']} after {meta['sequences_in_epoch']} sequences")
    return DataState.after(order, seed, meta["epoch"], meta["sequences_in_epoch"])
