"""The training pipeline's Ray Data source: the shards a manifest lists, planned from that list.

``ray.data.read_parquet`` plans a read by listing the paths and reading every file's footer (Ray
2.60's datasource v2 starts a pool of footer readers for it), then bins files into read tasks by
estimated size; the first block comes only after all of that, so the time to the first batch and
the planner's memory grew with the number of shards (BENCHMARKS.md, data section). A manifest
already names every shard, so ``ShardSource`` plans one read task per shard with no I/O, in the
order given, and each task streams its shard: it decodes one row group at a time, packs the
tokens into rows of ``seq_len + 1`` (concatenate-and-cut across the shard's documents; the tail
shorter than one row is dropped) and yields blocks of about ``BLOCK_TOKENS`` tokens as it goes.

Packing each shard on its own makes the rows a function of the shard alone, not of Ray's
block-size estimates, which the training order (workers/order.py) and exactly-once resume need.

A confined job's local shard is opened under its data roots (workers/confine.py, checked on the
descriptor opened): one replaced by a link out of them after the manifest was checked fails its
read, naming the file.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from workers.confine import Confinement
from workers.data import DataError

# Tokens per block a read task yields: 8 MiB of uint16 ids, small enough that a shard streams in
# several blocks, large enough that Ray's cost per object is noise.
BLOCK_TOKENS = 4 * 1024 * 1024


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


def _read_shard(filesystem: pafs.FileSystem, path: str, seq_len: int,
                roots: Confinement | None) -> Iterator[Block]:
    """The read task of one shard; a shard that cannot be read or decoded (or lies outside ``roots``,
    OutsideRoots) fails naming it."""
    block_rows = max(1, BLOCK_TOKENS // (seq_len + 1))
    try:
        with roots.open(path) if roots is not None else filesystem.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            groups = (shard.read_row_group(i, columns=["tokens"]) for i in range(shard.num_row_groups))
            for rows in packed_blocks(groups, seq_len, block_rows):
                yield BlockAccessor.batch_to_block({"input_ids": rows})
    except (pa.ArrowException, OSError, KeyError) as e:
        raise DataError(f"shard {path} cannot be read: {e}") from None


class ShardSource(Datasource):
    """One read task per shard of ``paths`` (inside ``filesystem``), in that order; local shards
    opened under ``roots`` when given (TrainingData.confinement)."""

    def __init__(self, paths: list[str], filesystem: pafs.FileSystem, seq_len: int,
                 roots: Confinement | None = None):
        super().__init__()
        self.paths, self.filesystem, self.seq_len, self.roots = paths, filesystem, seq_len, roots

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_shard, self.filesystem, path, self.seq_len, self.roots),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path]),
                         per_task_row_limit=per_task_row_limit)
                for path in self.paths]

    def get_name(self) -> str:
        return "ReadShards"
