"""One rank's training rows: the global position (workers/data/order.py) stepped on every rank alike,
and this rank's pieces read through Ray Data: one execution over the units the rank will need, in
order, read a few units ahead while the current one trains.

Why one execution per stretch, not per unit: a Ray Data execution costs its planning, its executor's
start, a resource request and its stats, ~100 ms of the reader's time (a 4 MiB unit reads in ~50),
and Ray keeps each execution's stats and per-dataset metric series (its ``_StatsActor`` and the
dashboard agent grew ~1.1 MiB per execution, GBs over an 8 GB set's ~4,000 units). A rank knows
the units it will take: it steps the global position like every rank, so a copy stepped with this
step's split (``DataState.upcoming``) lists them in the order it will need them, up to the epoch's
end or ``STRETCH_CLAIMS`` claims; one execution reads that list, order preserved, at most
``READ_TASKS`` read tasks at once and at most ``READ_AHEAD_UNITS`` units' blocks in the object
store (Ray Data's budget for it), so memory stays flat. When the units needed stop matching the
list (the split changed with ``train.split: speed``, the world size changed, a unit found corrupt,
a new epoch), the execution is dropped and one is started over the list from the current position:
the units it had read ahead are the only reads lost.

``TrainPlan`` is what the driver hands every worker (the canonical units and how to read them);
``RankStream.next(rows)`` returns this rank's ``rows[rank]`` sequences of the step and their ids.

``data.on_corrupt: skip``: a unit whose read task finds it corrupt is dropped by every rank at the
same step (``agree``, a collective the loop passes in: the ranks' finds are merged before the step's
pieces are final), so the ranks' positions stay one; ``fail`` needs no collective: the read task's
error, naming the file, ends the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs

from workers.confine import Confinement
from workers.data.cache import DataError
from workers.data.order import QUEUE_PIECES, DataState, Piece, Plan, Unit
from workers.data.storage import original_error

# The units of a read, in order, as (index in the list, the unit's packed rows in stored order, or
# why it is corrupt); a unit read as "drop" (the held-out split's skip) is left out.
# ``close()`` ends a read before its end. Started when called.
Reads = Callable[[list[Unit]], Iterator[tuple[int, "np.ndarray | str"]]]

READ_TASKS = QUEUE_PIECES  # read tasks of a rank at once
# Units' blocks a rank's read may hold in the object store (64 MiB of 4 MiB row groups: four read
# tasks' blocks of READ_TASK_BYTES, running and waiting): running tasks' outputs count in Ray Data's
# budget, and with less one task ran at a time and the rank waited for it. Also the most a dropped
# read may have read for nothing.
READ_AHEAD_UNITS = 16
STRETCH_CLAIMS = 4096  # units claimed by all ranks together that a rank looks ahead over (one execution)


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


def ray_reads(plan: TrainPlan) -> Reads:
    """Read units with one Ray Data execution (workers/data/reader.py ``UnitSource``, a read task per
    few consecutive units), their order kept, ``READ_TASKS`` tasks at once and ``READ_AHEAD_UNITS``
    units' bytes of object store; it starts when called, so it reads ahead before its first block
    is asked for. Ray Data's INFO lines (three per execution) and progress bars are left out of the
    worker's log."""
    import logging

    import ray.data

    from workers.data.reader import UnitSource

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    mode = "mark" if plan.on_corrupt == "skip" else "fail"

    def reads(units: list[Unit]) -> _RayRead:
        source = UnitSource(units, plan.filesystem, plan.seq_len, plan.roots, mode)
        tasks = len(source.groups())
        ds = ray.data.read_datasource(source, override_num_blocks=tasks, concurrency=min(READ_TASKS, tasks),
                                      runtime_env={"env_vars": plan.env} if plan.env else None)
        ds.context.enable_progress_bars = False
        options = ds.context.execution_options
        options.preserve_order = True
        options.resource_limits = ray.data.ExecutionResources(
            object_store_memory=READ_AHEAD_UNITS * max(2 * u.tokens for u in units))
        return _RayRead(ds)

    return reads


# Ray Data has no public way to end an execution before its end: its executor is a thread that only
# its shutdown stops, and iter_internal_ref_bundles keeps the executor to itself. These private
# Dataset methods build one here (Ray 2.60); tests/unit/workers/data/test_ray_data_private.py fails by
# name when a Ray upgrade moves them.
RAY_DATA_PRIVATE = ("_create_executor", "_build_bundle_iterator")


class _RayRead:
    """A running execution's units as (index, rows or why the unit is corrupt), from its blocks of a
    few units each (workers/data/reader.py ``block_units``); ``close`` ends it.

    The blocks are taken as the execution's block references, not through ``iter_batches``: in Ray
    2.60 every batch iterator starts a ``WaitBlockPrefetcher`` whose thread only the prefetcher's
    ``__del__`` stops, while that thread (its bound ``_run``) keeps the prefetcher alive, so none
    ever went (a thread per execution). The executor is created here (Dataset's
    ``_create_executor``, as ``iter_internal_ref_bundles`` does, which hands it to no one) so that a
    read left before its end (the rank's units changed, the held-out split read far enough) is shut
    down now, its running tasks cancelled, not when the garbage collector gets to it."""

    def __init__(self, ds: Any):
        self._executor = ds._create_executor()
        bundles = ds._build_bundle_iterator(self._executor)
        self._refs = (ref for bundle in bundles for ref in bundle.block_refs)
        self._units: list[tuple[int, np.ndarray | str]] = []  # the current block's units not yet taken, reversed

    def __iter__(self) -> _RayRead:
        return self

    def __next__(self) -> tuple[int, np.ndarray | str]:
        import ray
        from ray.exceptions import RayError

        from workers.data.reader import block_units

        while not self._units:
            try:
                self._units = block_units(ray.get(next(self._refs)))[::-1]
            except StopIteration:
                self.close()
                raise
            except Exception as e:  # Ray wraps the task's error with the remote traceback: the user needs its line
                self.close()
                cause = original_error(e, (DataError,), but=(RayError,))
                if cause is None:
                    raise
                raise type(cause)(str(cause)) from None
        return self._units.pop()

    def close(self) -> None:
        self._executor.shutdown(force=True)


class RankStream:
    """This rank's rows, step after step, from the global position ``state`` (module docstring)."""

    def __init__(self, plan: TrainPlan, state: DataState, rank: int, reads: Reads,
                 agree: Callable[[set[int]], set[int]] | None = None, log: Callable[[str], None] = print):
        self.plan, self.state, self.rank, self.reads, self.agree, self.log = plan, state, rank, reads, agree, log
        self._got: dict[int, np.ndarray | str] = {}  # unit -> its rows (or why it is corrupt), while held
        self._blocks: Iterator[tuple[int, np.ndarray | str]] | None = None
        self._units: list[int] = []  # the running read's units, in order
        self._next = 0  # the place in _units of the unit it yields next
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (epoch, unit) -> its row order
        self.read_bytes = 0  # stored bytes of the units this rank's reads fetched (dropped reads: at most)
        self.units_read = 0
        self.executions = 0  # Ray Data executions started (reads)

    def _expect(self, trial: DataState, pieces: list[Piece], rows: list[int]) -> None:
        """The running read yields the units this step takes and the rank then holds, in that
        order; else a new read from here over the units the rank will need."""
        need = list(dict.fromkeys(p.unit for p in [*pieces, *trial.held[self.rank]] if p.unit not in self._got))
        if self._blocks is not None and self._units[self._next:self._next + len(need)] == need:
            return
        ahead = [u for u in trial.upcoming(self.rank, rows, STRETCH_CLAIMS) if u not in self._got and u not in need]
        self._restart([*need, *ahead])

    def _restart(self, units: list[int]) -> None:
        self._drop()
        if units:
            self._units, self._next = units, 0
            self._blocks = self.reads([self.state.plan.units[u] for u in units])
            self.executions += 1

    def _drop(self) -> None:
        """Ends the running read; the units it may have read ahead count as read."""
        if self._blocks is not None:
            self._blocks.close()
            ahead = self._units[self._next:self._next + READ_AHEAD_UNITS]  # read tasks running and blocks waiting
            self.read_bytes += sum(self.state.plan.units[u].stored_bytes for u in ahead)
        self._blocks, self._units, self._next = None, [], 0

    def _take(self, unit: int) -> np.ndarray | str:
        """The unit's rows: read, or taken from the running read (``_expect`` put it next)."""
        while unit not in self._got:
            index, got = next(self._blocks)
            u = self._units[index]
            if index != self._next:
                raise AssertionError(f"the read yielded unit {u} out of order (expected {self._units[self._next]})")
            self._next += 1
            self._got[u] = got
            self.read_bytes += self.state.plan.units[u].stored_bytes
            self.units_read += 1
        return self._got[unit]

    def _perm(self, plan: Plan, epoch: int, unit: int) -> np.ndarray:
        key = (epoch, unit)
        if key not in self._perms:
            self._perms[key] = plan.row_order(self.state.seed, epoch, unit)
        return self._perms[key]

    def _within_heads(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The step taken on the stream's own state when it stays inside every rank's head piece
        (``DataState.within_heads``) and this rank holds that piece's rows: no trial on a copy, no
        check of the read's units (they stay the same). None when the step needs the whole path, or
        may meet a corrupt unit that the ranks must agree on (skip mode: every rank's every step goes
        through ``agree``, a collective)."""
        state = self.state
        if self.agree is not None or not state.within_heads(rows):
            return None
        got = self._got.get(state.held[self.rank][0].unit)
        if not isinstance(got, np.ndarray):
            return None
        (piece,) = state.step(rows)[self.rank]
        order = self._perm(state.plan, state.epoch, piece.unit)[piece.lo:piece.hi]
        return state.plan.offsets[piece.unit] + order, got[order]

    def next(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``rows[rank]`` sequences of the next step: (ids in the epoch (rows,),
        (rows, seq_len + 1) uint16). Collective in skip mode (``agree``)."""
        fast = self._within_heads(rows)
        if fast is not None:
            return fast
        plan = self.state.plan
        while True:
            trial = self.state.copy()
            pieces = trial.step(rows)[self.rank]
            self._expect(trial, pieces, rows)
            ids, parts, corrupt = [], [], set()
            for p in pieces:
                got = self._take(p.unit)
                if isinstance(got, str):
                    corrupt.add(p.unit)
                    continue
                order = self._perm(plan, trial.epoch, p.unit)[p.lo: p.hi]
                ids.append(plan.offsets[p.unit] + order)
                parts.append(got[order])
            if self.agree is not None:
                corrupt |= {u for u, got in self._got.items() if isinstance(got, str)}
                corrupt = self.agree(corrupt - self.state.dead) | corrupt
            corrupt -= self.state.dead
            if not corrupt:
                break
            for unit in sorted(corrupt):
                if isinstance(self._got.get(unit), str):
                    self.log(f"data: skipping a corrupt unit: {self._got[unit]}")
                elif self.rank == 0:
                    self.log(f"data: skipping {plan.units[unit].name()}, found corrupt by another worker")
            self.state.mark_dead(corrupt)
        self.state = trial
        keep = {p.unit for p in trial.held[self.rank]}
        self._got = {u: got for u, got in self._got.items() if u in keep}
        self._perms = {k: v for k, v in self._perms.items() if k[1] in keep and k[0] == trial.epoch}
        width = plan.seq_len + 1
        x = np.concatenate(parts) if parts else np.empty((0, width), dtype=np.uint16)
        return (np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)), x

    def close(self) -> None:
        self._drop()


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
