"""The training order: the rows every rank streams (workers/data.py), cut into seeded windows and
then into global batches, the same whatever the block sizes, the world size or the batch size.

A sequence is named by (epoch, index in the epoch): the loop cuts its rows out of each global batch
and a checkpoint stores the index reached, so a resume on any world size continues at exactly the
next sequence. Cutting is linear in the rows streamed: Ray Data hands over a shard's rows as one
block, and a window or batch copies only its own rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

SHUFFLE_WINDOW_ROWS = 1024


class _Rows:
    """A queue of row blocks that hands out the first n rows, copying only those rows (slices of a
    block are views): cutting a long block into windows or batches stays linear in its size."""

    def __init__(self) -> None:
        self.blocks: deque[np.ndarray] = deque()
        self.count = 0

    def push(self, block: np.ndarray) -> None:
        if len(block):
            self.blocks.append(block)
            self.count += len(block)

    def take(self, n: int) -> np.ndarray:
        """The first ``min(n, count)`` rows."""
        parts, need = [], min(n, self.count)
        self.count -= need
        while need:
            head = self.blocks[0]
            if len(head) <= need:
                parts.append(self.blocks.popleft())
                need -= len(head)
            else:
                parts.append(head[:need])
                self.blocks[0], need = head[need:], 0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def ordered_rows(blocks: Iterable[np.ndarray], seed: int, epoch: int,
                 window_rows: int = SHUFFLE_WINDOW_ROWS) -> Iterator[np.ndarray]:
    """The epoch's packed rows (blocks of (rows, seq_len + 1), in stream order) in the training order:
    windows of ``window_rows`` rows, each permuted with a generator seeded by (seed, epoch, window);
    the last window may be shorter. The same stream gives the same order whatever the block sizes."""
    pending, window = _Rows(), 0

    def permuted(rows: np.ndarray) -> np.ndarray:
        return rows[np.random.default_rng((seed, epoch, window)).permutation(len(rows))]

    for block in blocks:
        pending.push(block)
        while pending.count >= window_rows:
            yield permuted(pending.take(window_rows))
            window += 1
    if pending.count:
        yield permuted(pending.take(pending.count))


def global_batches(windows: Iterable[np.ndarray], batch_rows: int, skip: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index in the epoch of the first row, (batch_rows, seq_len + 1) rows) for each whole global batch
    of the ordered rows after the first ``skip`` (the sequences a checkpoint says were trained on)."""
    pending, start = _Rows(), 0
    for rows in windows:
        if start + len(rows) <= skip:
            start += len(rows)
            continue
        if start < skip:
            rows, start = rows[skip - start:], skip
        pending.push(rows)
        while pending.count >= batch_rows:
            yield start, pending.take(batch_rows)
            start += batch_rows
