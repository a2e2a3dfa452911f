"""The training order and the global data position: which sequences each worker trains at each step.

Units. The training split is a fixed list of canonical units (``Unit``): one row group of a shard
(or a whole shard of an older preparation, stored as one row group). A unit is packed on its own
(concatenate-and-cut, tail dropped), so it holds ``tokens // (seq_len + 1)`` sequences, known from
the manifest with no I/O. A sequence is named by ``offset[unit] + row``: its id in the epoch.

Epoch order, a function of (seed, epoch) only: the units in a permutation seeded by (seed, epoch),
each unit's rows in a permutation seeded by (seed, epoch, unit). Epochs reshuffle both.

Who reads what (``DataState.step``): every rank holds a short queue of pieces (unit, rows [lo, hi)
of its permuted order); at each step rank r takes its ``rows[r]`` sequences (the batch split,
equal or speed-aware) from the front of its queue and tops the queue up to ``QUEUE_PIECES`` by
claiming the next unit of the epoch order. Ranks claim in rank order, from a state every rank
computes alike from the same split, so no rank is told anything and each unit is read by one rank:
read amplification 1.0. When no unit is left to claim, a rank short of rows takes the back half of
the longest piece another rank holds (so the epoch's last few units may be read by two ranks). The
epoch ends when fewer sequences remain than one global batch needs (fewer than the batch are dropped).

The position (``state_dict``) is the epoch, the next unit to claim and the pieces in the ranks'
queues: O(world) numbers, whatever the data's size. A resume on any world size puts those pieces
first in the claim order, and each is read from its row group, seeking past consumed rows: nothing
consumed is read again beyond one row group per piece, nothing is trained twice, nothing skipped.
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Pieces a rank holds: the one it trains from and the next, which its reader fetches meanwhile.
QUEUE_PIECES = 2


@dataclass(frozen=True)
class Unit:
    """One canonical read unit: a row group of a shard (``row_group`` None: the whole shard, an
    older preparation's single row group), with what verifies it."""

    path: str  # inside the data's filesystem
    row_group: int | None
    tokens: int
    sha256: str  # of the row group's tokens as little-endian uint16 (row_group set), else of the shard file
    stored_bytes: int  # compressed bytes on storage: the row group's column chunks, or the file

    def sequences(self, seq_len: int) -> int:
        return self.tokens // (seq_len + 1)

    def name(self) -> str:
        return self.path if self.row_group is None else f"{self.path} (row group {self.row_group})"


@dataclass
class Piece:
    unit: int  # index in the canonical unit list
    lo: int  # rows [lo, hi) of the unit's permuted order
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class Plan:
    """The canonical units and their sequence counts for one ``seq_len``: what every epoch orders."""

    def __init__(self, units: list[Unit], seq_len: int):
        self.units, self.seq_len = units, seq_len
        self.counts = np.array([u.sequences(seq_len) for u in units], dtype=np.int64)  # (units,)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # (units + 1,) first id of each unit
        self.total = int(self.offsets[-1])
        key = repr([(u.path, u.row_group, u.tokens) for u in units]) + f"/{seq_len}"
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]  # names the plan in a checkpoint

    def unit_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((seed, epoch)).permutation(len(self.units))

    def row_order(self, seed: int, epoch: int, unit: int) -> np.ndarray:
        """The unit's rows in the epoch's order: a permutation of range(count)."""
        return np.random.default_rng((seed, epoch, unit)).permutation(int(self.counts[unit]))


@dataclass
class DataState:
    """The global position: the same on every rank (module docstring)."""

    plan: Plan
    seed: int
    epoch: int = 0
    next: int = 0  # index in the epoch's unit order of the next unit to claim
    pending: list[Piece] = field(default_factory=list)  # pieces from a checkpoint, claimed first
    held: list[list[Piece]] = field(default_factory=list)  # per rank: its queue
    dead: set[int] = field(default_factory=set)  # units found corrupt (data.on_corrupt: skip)
    consumed: int = 0  # sequences of the epoch trained, over all ranks

    def __post_init__(self) -> None:
        self._reorder()

    def _reorder(self) -> None:
        self._order = self.plan.unit_order(self.seed, self.epoch)  # (units,)
        self._position = np.argsort(self._order)  # (units,) where each unit is in the order
        counts = self.plan.counts[self._order]
        self._suffix = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])  # (units + 1,) rows from i on

    # -- the position in a checkpoint -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pieces = [*self.pending, *(p for q in self.held for p in q)]
        return {"plan": self.plan.key, "epoch": self.epoch, "next": self.next, "consumed": self.consumed,
                "pieces": [[p.unit, p.lo, p.hi] for p in pieces if p.rows > 0]}

    @classmethod
    def restore(cls, plan: Plan, seed: int, saved: dict[str, Any]) -> DataState:
        """The state a checkpoint saved, for any world size. Raises ValueError when it was saved
        for another dataset or ``seq_len``."""
        if saved.get("plan") != plan.key:
            raise ValueError(f"the checkpoint's data position belongs to another dataset or seq_len "
                             f"(plan {saved.get('plan')}, this run's {plan.key})")
        return cls(plan, seed, saved["epoch"], saved["next"], [Piece(*p) for p in saved["pieces"]],
                   consumed=saved["consumed"])

    @classmethod
    def after(cls, plan: Plan, seed: int, epoch: int, consumed: int) -> DataState:
        """The state after the epoch's first ``consumed`` sequences in claim order (a checkpoint of
        an earlier version, which stored only that count)."""
        state = cls(plan, seed, epoch)
        left = consumed
        while left > 0 and state.next < len(plan.units):
            unit = int(state._order[state.next])
            state.next += 1
            count = int(plan.counts[unit])
            if count > left:
                state.pending.append(Piece(unit, left, count))
            left -= min(left, count)
        state.consumed = consumed - left
        return state

    def fingerprint(self) -> list[int]:
        """Small integers that differ when two ranks' states differ (a cheap collective check)."""
        d = self.state_dict()
        return [self.epoch, self.next, self.consumed, zlib.crc32(repr(d["pieces"]).encode())]

    # -- stepping --------------------------------------------------------------------------------
    def remaining(self) -> int:
        """Sequences of the epoch not yet trained (dead units' excepted). Loops, not generators: it is
        asked at every step."""
        left = int(self._suffix[self.next])
        if self.dead:
            left -= sum(int(self.plan.counts[u]) for u in self.dead if self._position[u] >= self.next)
        for p in self.pending:
            left += p.hi - p.lo
        for queue in self.held:
            for p in queue:
                left += p.hi - p.lo
        return left

    def _claim(self) -> Piece | None:
        while self.pending:
            piece = self.pending.pop(0)
            if piece.rows > 0 and piece.unit not in self.dead:
                return piece
        while self.next < len(self._order):
            unit = int(self._order[self.next])
            self.next += 1
            if self.plan.counts[unit] > 0 and unit not in self.dead:
                return Piece(unit, 0, int(self.plan.counts[unit]))
        return None

    def _steal(self, thief: int, need: int) -> Piece | None:
        """Nothing left to claim: the back half (at least ``need`` rows) of the longest piece another
        rank holds (ties: lowest unit) becomes the thief's. Halving keeps the steals, and so the
        units read by two ranks, few: only the epoch's last pieces are ever split."""
        pieces = [(p.rows, -p.unit, q, p) for r, q in enumerate(self.held) if r != thief for p in q if p.rows > 0]
        if not pieces:
            return None
        _, _, queue, victim = max(pieces, key=lambda t: t[:2])
        k = min(victim.rows, max(need, victim.rows // 2))
        victim.hi -= k
        if victim.rows == 0:
            queue.remove(victim)
        return Piece(victim.unit, victim.hi, victim.hi + k)

    def new_epoch(self) -> None:
        self.epoch, self.next, self.consumed = self.epoch + 1, 0, 0
        self.pending, self.held, self.dead = [], [[] for _ in self.held], set()
        self._reorder()

    def step(self, rows: list[int]) -> list[list[Piece]]:
        """Take ``rows[r]`` sequences for each rank r: per rank, the pieces it trains this step, in
        order. Starts the next epoch first when this one cannot fill the step."""
        world = len(rows)
        if len(self.held) != world:  # the first step on this world size: queues back into the claim order
            self.pending = [p for q in self.held for p in q if p.rows > 0] + self.pending
            self.held = [[] for _ in range(world)]
        if self.remaining() < sum(rows):
            if self.consumed == 0:
                raise RuntimeError(f"the training data yields no global batch of {sum(rows)} sequences (it holds "
                                   f"{self.remaining()}); use a larger corpus (data.source, data.max_bytes) or a "
                                   "smaller train.batch_size")
            self.new_epoch()
            return self.step(rows)
        out: list[list[Piece]] = []
        for r, need in enumerate(rows):
            queue, taken = self.held[r], []
            while need > 0:
                if not queue:
                    piece = self._claim() or self._steal(r, need)
                    if piece is None:
                        raise AssertionError("remaining() promised rows that no piece holds")
                    queue.append(piece)
                head = queue[0]
                k = min(need, head.rows)
                taken.append(Piece(head.unit, head.lo, head.lo + k))
                head.lo += k
                need -= k
                if head.rows == 0:
                    queue.pop(0)
            while len(queue) < QUEUE_PIECES and (piece := self._claim()) is not None:
                queue.append(piece)
            out.append(taken)
        self.consumed += sum(rows)
        return out

    def within_heads(self, rows: list[int]) -> bool:
        """Whether a step of ``rows`` takes every rank's rows from inside its head piece, queues
        full: no piece ends and no unit is claimed, so the units the ranks read stay the same. Most
        steps are such (a unit holds thousands of sequences), and a reader may take them on its own
        state, without trying the step on a copy first (workers/data/stream.py)."""
        return all(len(queue) >= QUEUE_PIECES for queue in self.held) and self._head_steps(rows) >= 1

    def _head_steps(self, rows: list[int]) -> int:
        """How many steps of ``rows`` every rank taking rows can take from inside its head piece
        without finishing it; 0 when one holds no head piece or the world size changed."""
        if len(self.held) != len(rows):
            return 0
        heads = [(q[0], n) for q, n in zip(self.held, rows, strict=True) if n > 0 and q]
        if len(heads) != sum(1 for n in rows if n > 0):
            return 0
        return min(((p.rows - 1) // n for p, n in heads), default=0)

    def upcoming(self, rank: int, rows: list[int], claims: int) -> list[int]:
        """The units ``rank`` will take next beyond those it holds, in the order it will need them, if
        every step takes ``rows``: what its reader reads ahead (workers/data/stream.py). Stepped on a
        copy until the epoch ends or ``claims`` units are claimed by all ranks together (the
        simulation's cost: a step of every rank per claim); steps in which no rank finishes a piece
        are jumped over at once, so a unit of 16k sequences costs a few steps, not 16k / rows."""
        sim, out = self.copy(), []
        seen = {p.unit for p in sim.held[rank]} if len(sim.held) == len(rows) else set()
        start = sim.next
        while sim.next - start < claims and sim.remaining() >= sum(rows):
            for p in [*sim.step(rows)[rank], *sim.held[rank]]:
                if p.unit not in seen:
                    seen.add(p.unit)
                    out.append(p.unit)
            sim._jump(rows)
        return out

    def _jump(self, rows: list[int]) -> None:
        """The steps in which every rank takes from its head piece and none finishes it, taken at
        once (the same state as stepping them one by one: no claim, no pop, and the epoch cannot
        end, as every head keeps more than its rank's rows)."""
        k = self._head_steps(rows)
        if k <= 0:
            return
        for queue, n in zip(self.held, rows, strict=True):
            if n > 0:
                queue[0].lo += k * n
        self.consumed += k * sum(rows)

    def mark_dead(self, units: set[int]) -> None:
        """Units found corrupt: their rows not yet trained are dropped from every queue."""
        self.dead |= units
        self.pending = [p for p in self.pending if p.unit not in units]
        self.held = [[p for p in q if p.unit not in units] for q in self.held]

    def copy(self) -> DataState:
        """A copy to step on trial (every step takes one): it shares the epoch's order arrays, which
        are replaced at a new epoch and never changed in place, so a step costs no O(units) work
        (re-deriving them took 74 us a step at 2,048 units and 11 ms at 2**18, 1 TiB of 4 MiB row
        groups; now 5-6 us at either)."""
        new = copy.copy(self)
        new.pending = [Piece(p.unit, p.lo, p.hi) for p in self.pending]
        new.held = [[Piece(p.unit, p.lo, p.hi) for p in q] for q in self.held]
        new.dead = set(self.dead)
        return new
