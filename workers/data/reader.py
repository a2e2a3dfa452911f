"""Reading packed rows: one canonical unit (``read_unit``; through ``UnitSource``, one Ray Data read
task per unit of a read, for both splits).

A unit's read task opens its shard, reads one row group (a bounded few MiB), checks it against the
manifest (the SHA-256 of its tokens; an older preparation's one-row-group shard: the file's size and
SHA-256, read whole) and packs it on its own: so integrity costs no scan before training, each
check runs once, in parallel, in the task that reads the bytes anyway, and a task holds about one
decoded row group. A mismatch fails the task naming the file (``data.on_corrupt: fail``) or, with
``skip``, yields a block that says so and no rows (workers/data/stream.py drops the unit).

A manifest already names every shard and row group, so planning a read needs no I/O (Ray 2.60's
``read_parquet`` would list the paths and read every footer first). Packing each unit on its own
(concatenate its documents' tokens and cut rows of ``seq_len + 1``, the tail shorter than one row
dropped) makes its rows a function of the unit alone, not of Ray's block-size estimates, which the
training order (workers/data/order.py) and exactly-once resume need.

A confined job's local shard is opened under its data roots (workers/confine.py, checked on the
descriptor opened): one replaced by a link out of them after the manifest was checked fails its
read, naming the file.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import Block, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from workers.confine import Confinement, OutsideRoots
from workers.data.cache import DataError
from workers.data.order import Unit
from workers.data.storage import uri_of


def packed_blocks(tables: Iterable[pa.Table | pa.RecordBatch], seq_len: int,
                  block_rows: int) -> Iterator[np.ndarray]:
    """The rows of ``seq_len + 1`` tokens that concatenating the documents of ``tables`` (their
    ``tokens`` column, in order) and cutting gives, in blocks of at most ``block_rows`` rows; the
    tail shorter than one row is dropped. The same rows however the documents are batched."""
    width = seq_len + 1
    carry = np.empty(0, dtype=np.uint16)
    for table in tables:
        flat = pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False)  # (tokens,)
        if len(carry):
            flat = np.concatenate([carry, flat])
        whole = len(flat) // width * width
        rows = flat[:whole].reshape(-1, width)  # (rows, seq_len + 1), a view
        carry = flat[whole:].copy()
        for start in range(0, len(rows), block_rows):
            yield rows[start:start + block_rows]


def pack_sequences(table: pa.Table, seq_len: int) -> np.ndarray:
    """All of ``table``'s packed rows as one (rows, seq_len + 1) array (a shard read whole)."""
    blocks = list(packed_blocks([table], seq_len, sys.maxsize))
    return blocks[0] if blocks else np.empty((0, seq_len + 1), dtype=np.uint16)


class CorruptUnit(DataError):
    """A unit whose bytes or tokens differ from its manifest; the message names the file."""


def _flat_tokens(table: pa.Table) -> np.ndarray:
    return pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False).astype("<u2", copy=False)


def read_unit(filesystem: pafs.FileSystem, unit: Unit, seq_len: int, roots: Confinement | None) -> np.ndarray:
    """The unit's packed rows, (sequences, seq_len + 1) uint16 in stored order, verified against the
    manifest. Raises CorruptUnit naming the file (a mismatch, a missing file or an undecodable row
    group), OutsideRoots when a local shard lies outside ``roots``."""
    import hashlib

    # "shard URI is corrupt (row group N): why": the file's name first, as every data error names it
    label = uri_of(filesystem, unit.path)
    group = "" if unit.row_group is None else f" (row group {unit.row_group})"
    try:
        with roots.open(unit.path) if roots is not None else filesystem.open_input_file(unit.path) as f:
            if unit.row_group is None:  # an older preparation's shard: one row group, verified as a file
                raw = f.read()
                if len(raw) != unit.stored_bytes or hashlib.sha256(raw).hexdigest() != unit.sha256:
                    raise CorruptUnit(f"shard {label} is corrupt{group}: its size or SHA-256 differs from the manifest")
                flat = _flat_tokens(pq.read_table(pa.BufferReader(raw), columns=["tokens"]))
            else:
                flat = _flat_tokens(pq.ParquetFile(f).read_row_group(unit.row_group, columns=["tokens"]))
                if hashlib.sha256(memoryview(np.ascontiguousarray(flat))).hexdigest() != unit.sha256:
                    raise CorruptUnit(f"shard {label} is corrupt{group}: its tokens' SHA-256 differs from the manifest")
    except FileNotFoundError:
        raise CorruptUnit(f"shard {label} is missing{group}") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, IndexError) as e:
        if isinstance(e, OutsideRoots):
            raise
        raise CorruptUnit(f"shard {label} is corrupt{group}: {e}") from None
    if len(flat) != unit.tokens:
        raise CorruptUnit(f"shard {label} is corrupt{group}: {len(flat)} tokens, the manifest lists {unit.tokens}")
    width = seq_len + 1
    n = len(flat) // width
    return flat[: n * width].reshape(n, width)  # (sequences, seq_len + 1)


# What a unit's read task does with a corrupt unit: raise naming the file; yield a block that says
# so (the training stream drops the unit on every rank); yield nothing (the held-out split).
OnCorrupt = Literal["fail", "mark", "drop"]


def _read_unit_task(filesystem: pafs.FileSystem, unit: Unit, seq_len: int, roots: Confinement | None,
                    on_corrupt: OnCorrupt, index: int = 0) -> Iterator[Block]:
    """The unit's block, tagged with ``index`` (its place in the read's unit list), so the reader
    matches blocks to units whatever Ray Data does with empty ones. The rows go in as a fixed-size
    list column over the tokens' buffer, no copy (Ray's conversion of a 2-D array to its tensor
    column took a third of the task's time)."""
    try:
        rows = read_unit(filesystem, unit, seq_len, roots)
    except CorruptUnit as e:
        if on_corrupt == "fail":
            raise
        if on_corrupt == "mark":
            yield pa.table({"corrupt": [str(e)], "unit": pa.array([index], pa.int32())})
        return
    flat = pa.array(np.ascontiguousarray(rows).reshape(-1))  # (rows * (seq_len + 1),)
    yield pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, seq_len + 1),
                    "unit": pa.array(np.full(len(rows), index, dtype=np.int32))})


def unit_rows(block: pa.Table) -> tuple[int, np.ndarray | str] | None:
    """A read task's block as (its index in the read, the unit's rows (rows, seq_len + 1) or why it
    is corrupt); None for an empty one. The rows are a view of the block's buffer."""
    if not block.num_rows:
        return None
    index = block.column("unit")[0].as_py()
    if "corrupt" in block.column_names:
        return index, block.column("corrupt")[0].as_py()
    col = block.column("input_ids").combine_chunks()
    return index, col.flatten().to_numpy().reshape(len(col), col.type.list_size)


class UnitSource(Datasource):
    """One read task per unit of ``units``: its verified, packed rows as one block, its ``unit``
    column the unit's place in ``units``."""

    def __init__(self, units: list[Unit], filesystem: pafs.FileSystem, seq_len: int,
                 roots: Confinement | None = None, on_corrupt: OnCorrupt = "fail"):
        super().__init__()
        self.units, self.filesystem, self.seq_len = units, filesystem, seq_len
        self.roots, self.on_corrupt = roots, on_corrupt

    def estimate_inmemory_data_size(self) -> int:
        return sum(2 * u.tokens for u in self.units)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_unit_task, self.filesystem, u, self.seq_len, self.roots,
                                           self.on_corrupt, i),
                         BlockMetadata(num_rows=None, size_bytes=2 * u.tokens, exec_stats=None, input_files=[u.path]),
                         per_task_row_limit=per_task_row_limit)
                for i, u in enumerate(self.units)]

    def get_name(self) -> str:
        return "ReadUnits"
