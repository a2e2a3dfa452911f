"""Reading packed rows: one canonical unit (``read_unit``; through ``UnitSource``, Ray Data read
tasks of a few consecutive units of a read, for both splits).

A read task opens each of its units' shards, reads the unit's row group (a bounded few MiB), checks it
against the manifest (the SHA-256 of its tokens; an older preparation's one-row-group shard: the
file's size and SHA-256, read whole) and packs it on its own: so integrity costs no scan before
training, each check runs once, in parallel, in the task that reads the bytes anyway, and a task
holds its few units' rows (``READ_TASK_BYTES``) and one row group being decoded. A mismatch fails
the task naming the file (``data.on_corrupt: fail``) or, with ``skip``, puts a row in its block
that says so and no rows of that unit (workers/data/stream.py drops the unit).

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

# Packed rows one read task reads (its units, one after the other): four 4 MiB row groups. A task
# costs ~17 ms of CPU besides its reading, about what reading a 4 MiB row group costs (510 read
# tasks that read nothing took 8.6 CPU-s on 2 cores: ~9 ms in the driver's Ray Data executor, ~5 in
# the task's process, ~3 in the raylet), so a task per row group spent half the epoch's CPU on Ray.
READ_TASK_BYTES = 16 << 20


def _read_unit_task(filesystem: pafs.FileSystem, unit: Unit, seq_len: int, roots: Confinement | None,
                    on_corrupt: OnCorrupt, index: int = 0) -> Iterator[Block]:
    """The unit's block, tagged with ``index`` (its place in the read's unit list), so the reader
    matches rows to units whatever Ray Data does with blocks. The rows go in as a fixed-size list
    column over the tokens' buffer, no copy (Ray's conversion of a 2-D array to its tensor column
    took a third of the task's time); a corrupt unit's block is one row of zeros, its ``corrupt``
    column saying why (the same columns, so a task's blocks concatenate)."""
    width = seq_len + 1
    try:
        rows = read_unit(filesystem, unit, seq_len, roots)
    except CorruptUnit as e:
        if on_corrupt == "fail":
            raise
        if on_corrupt == "mark":
            yield pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(width, np.uint16)), width),
                            "unit": pa.array([index], pa.int32()), "corrupt": pa.array([str(e)])})
        return
    flat = pa.array(rows.reshape(-1))  # (rows * (seq_len + 1),), a view of the tokens
    yield pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, width),
                    "unit": pa.array(np.full(len(rows), index, dtype=np.int32)),
                    "corrupt": pa.nulls(len(rows), pa.string())})


def _read_units_task(filesystem: pafs.FileSystem, units: list[tuple[int, Unit]], seq_len: int,
                     roots: Confinement | None, on_corrupt: OnCorrupt) -> Iterator[Block]:
    """The units' blocks, read one after the other (each verified), as one block: Ray Data merges a
    task's blocks into one anyway, up to its target block size."""
    tables = [t for index, unit in units for t in _read_unit_task(filesystem, unit, seq_len, roots, on_corrupt, index)]
    if tables:
        yield pa.concat_tables(tables)  # their chunks side by side, no copy


def block_units(block: pa.Table) -> list[tuple[int, np.ndarray | str]]:
    """A read task's block as (index in the read, the unit's rows (rows, seq_len + 1) or why it is
    corrupt) per unit, in order; units with no rows are absent. The rows are views of the block."""
    if not block.num_rows:
        return []
    index = block.column("unit").to_numpy()  # (rows,)
    starts = [0, *(np.flatnonzero(index[1:] != index[:-1]) + 1).tolist()]
    corrupt, col = block.column("corrupt"), block.column("input_ids")
    any_corrupt = corrupt.null_count < len(corrupt)
    out: list[tuple[int, np.ndarray | str]] = []
    for start, end in zip(starts, [*starts[1:], len(index)], strict=True):
        if any_corrupt and corrupt[start].is_valid:
            out.append((int(index[start]), corrupt[start].as_py()))
            continue
        rows = col.slice(start, end - start).combine_chunks()  # one unit: within one chunk, no copy
        out.append((int(index[start]), rows.flatten().to_numpy().reshape(len(rows), rows.type.list_size)))
    return out


class UnitSource(Datasource):
    """Read tasks over ``units``, in order: the first unit alone (the rows needed now come after one
    row group's read), then consecutive units up to ``READ_TASK_BYTES`` of rows each; a task's
    block holds its units' rows, its ``unit`` column each row's unit as its place in ``units``."""

    def __init__(self, units: list[Unit], filesystem: pafs.FileSystem, seq_len: int,
                 roots: Confinement | None = None, on_corrupt: OnCorrupt = "fail"):
        super().__init__()
        self.units, self.filesystem, self.seq_len = units, filesystem, seq_len
        self.roots, self.on_corrupt = roots, on_corrupt

    def estimate_inmemory_data_size(self) -> int:
        return sum(2 * u.tokens for u in self.units)

    def groups(self) -> list[list[tuple[int, Unit]]]:
        """The units of each read task, with their places in ``units``."""
        out: list[list[tuple[int, Unit]]] = []
        size = READ_TASK_BYTES
        for i, unit in enumerate(self.units):
            if i == 1 or size + 2 * unit.tokens > READ_TASK_BYTES:
                out.append([])
                size = 0
            out[-1].append((i, unit))
            size += 2 * unit.tokens
        return out

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_units_task, self.filesystem, group, self.seq_len, self.roots,
                                           self.on_corrupt),
                         BlockMetadata(num_rows=None, size_bytes=sum(2 * u.tokens for _, u in group), exec_stats=None,
                                       input_files=list(dict.fromkeys(u.path for _, u in group))),
                         per_task_row_limit=per_task_row_limit)
                for group in self.groups()]

    def get_name(self) -> str:
        return "ReadUnits"
