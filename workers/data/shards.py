"""One shard: read its files, tokenize, pack, write the parquet and its done-record.

Runs inside a Ray Data task (or in-process in unit tests). A shard is written whole or not at all
(``write_bytes_atomic``), under a name fixed by the plan, so a retried or re-run task rewrites the
same bytes and a crash never leaves a partial file under that name. The done-record, written after
the shard, is what a resumed preparation trusts; the manifest, written after every shard, is what
a reader trusts. A source file linked out of the job's data roots since the listing (workers/confine.py)
is skipped and counted, never read.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.confine import OutsideRoots
from workers.data.manifest import RowGroupEntry, ShardEntry, sha256_hex
from workers.data.sources import ShardPlan, is_text, service_roots
from workers.data.storage import join, open_fs, read_bytes, uri_of, where, with_retries, write_bytes_atomic
from workers.data.tokenizer import TOKEN_DTYPE, Tokenizer, load_tokenizer

DONE_SUFFIX = ".done.json"
PARQUET_COMPRESSION = "zstd"
# Documents tokenized per call: bounds the text held twice (str + ids) for a BPE batch.
ENCODE_BATCH_DOCS = 64


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)  # (rows + 1,)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, TOKEN_DTYPE)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.uint16()))


def pack_rows(paths: list[str], docs: list[np.ndarray], pack_len: int) -> tuple[list[str], list[np.ndarray]]:
    """Concatenate documents (each ending in EOS) and cut rows of exactly ``pack_len`` tokens; a row's
    path is the document it starts in. The tail shorter than one row is dropped."""
    if not docs:
        return [], []
    flat = np.concatenate(docs)  # (tokens,)
    starts = np.zeros(len(docs), dtype=np.int64)  # (docs,) offset of each document in flat
    np.cumsum([len(d) for d in docs[:-1]], out=starts[1:])
    n_rows = len(flat) // pack_len
    row_starts = np.arange(n_rows, dtype=np.int64) * pack_len  # (rows,)
    owner = np.searchsorted(starts, row_starts, side="right") - 1  # (rows,) document index
    rows = list(flat[: n_rows * pack_len].reshape(n_rows, pack_len))
    return [paths[i] for i in owner], rows


def shard_table(paths: list[str], docs: list[np.ndarray]) -> pa.Table:
    return pa.table({"path": pa.array(paths, pa.string()), "tokens": _list_array(docs)})


def group_bounds(docs: list[np.ndarray], group_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges of about ``group_bytes`` bytes of tokens each (at least one
    row per group; a longer row is a group of its own)."""
    bounds, start, size = [], 0, 0
    for i, d in enumerate(docs):
        if size and size + d.nbytes > group_bytes:
            bounds.append((start, i))
            start, size = i, 0
        size += d.nbytes
    if start < len(docs) or not bounds:
        bounds.append((start, len(docs)))
    return bounds


def write_shard(paths: list[str], docs: list[np.ndarray], group_bytes: int) -> tuple[bytes, list[RowGroupEntry]]:
    """The parquet bytes of a shard in row groups of about ``group_bytes`` of tokens, and each row
    group's entry (rows, tokens, compressed bytes, SHA-256 of its tokens)."""
    table = shard_table(paths, docs)
    bounds = group_bounds(docs, group_bytes)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression=PARQUET_COMPRESSION) as writer:
        for a, b in bounds:
            writer.write_table(table.slice(a, b - a), row_group_size=max(1, b - a))
    data = sink.getvalue().to_pybytes()
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    groups = []
    for i, (a, b) in enumerate(bounds):
        rg = meta.row_group(i)
        flat = np.concatenate(docs[a:b]).astype("<u2") if b > a else np.zeros(0, "<u2")
        groups.append(RowGroupEntry(rows=b - a, tokens=len(flat), sha256=sha256_hex(flat.tobytes()),
                                    stored_bytes=sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))))
    return data, groups


def done_path(out: str, name: str) -> str:
    return join(out, name + DONE_SUFFIX)


def build_shard(shard: ShardPlan, *, source: str, out: str, out_rel: str, tokenizer: Tokenizer,
                pack_len: int | None, group_bytes: int) -> ShardEntry:
    """Tokenize ``shard``'s files from ``source`` and write ``<out>/<name>.parquet`` + its done-record.

    ``out`` is the staging prefix (a URI), ``out_rel`` the same prefix relative to the manifest.
    Files that are not UTF-8 text (NUL, invalid UTF-8, empty) are skipped and counted, and so are
    files linked out of the job's data roots.
    """
    src_fs, src_root = open_fs(source)
    out_fs, out_root = open_fs(out)
    also = service_roots(src_root)
    paths: list[str] = []
    docs: list[np.ndarray] = []
    skipped = linked_out = 0
    for i in range(0, len(shard.files), ENCODE_BATCH_DOCS):
        batch_paths, batch_raw = [], []
        for rel in shard.files[i: i + ENCODE_BATCH_DOCS]:
            path = join(src_root, rel)
            try:
                raw = with_retries(f"cannot read {where(uri_of(src_fs, path))}",
                                   lambda p=path: read_bytes(src_fs, p, also=also))
            except OutsideRoots:
                linked_out += 1
                continue
            if not raw or not is_text(raw):
                skipped += 1
                continue
            batch_paths.append(rel)
            batch_raw.append(raw)
        paths += batch_paths
        docs += tokenizer.encode_docs(batch_raw)
    documents = len(docs)
    if pack_len is not None:
        paths, docs = pack_rows(paths, docs, pack_len)
    data, groups = write_shard(paths, docs, group_bytes)
    entry = ShardEntry(file=f"{out_rel}/{shard.name}.parquet", bytes=len(data), sha256=sha256_hex(data),
                       split=shard.split, rows=len(docs), tokens=int(sum(len(d) for d in docs)),
                       documents=documents, input_bytes=shard.input_bytes, skipped_binary=skipped,
                       skipped_links=linked_out, row_groups=groups)
    write_bytes_atomic(out_fs, join(out_root, f"{shard.name}.parquet"), data)
    record = {"files": list(shard.files), "entry": entry.model_dump(mode="json")}
    write_bytes_atomic(out_fs, done_path(out_root, shard.name), json.dumps(record).encode())
    return entry


def read_done(fs: pafs.FileSystem, out_root: str, shard: ShardPlan) -> ShardEntry | None:
    """The finished shard's entry if its done-record is there, names the same files, and the
    shard's file has the recorded size; else None (the shard is (re)built)."""
    path = done_path(out_root, shard.name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        record = json.loads(read_bytes(fs, path))
        entry = ShardEntry.model_validate(record["entry"])
    except (ValueError, KeyError, TypeError):
        return None
    if tuple(record.get("files", ())) != shard.files:
        return None
    info = fs.get_file_info(join(out_root, f"{shard.name}.parquet"))
    return entry if info.type == pafs.FileType.File and info.size == entry.bytes else None


def build_shard_batch(batch: dict[str, np.ndarray], *, source: str, out: str, out_rel: str,
                      tokenizer_json: str, pack_len: int | None, group_bytes: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` adapter: rows of JSON shard plans in, rows of JSON entries out."""
    tokenizer = load_tokenizer(tokenizer_json)
    entries = []
    for plan_json in batch["plan"]:
        p = json.loads(plan_json)
        shard = ShardPlan(p["name"], p["split"], tuple(p["files"]), p["input_bytes"])
        entries.append(build_shard(shard, source=source, out=out, out_rel=out_rel, tokenizer=tokenizer,
                                   pack_len=pack_len, group_bytes=group_bytes).model_dump_json())
    return {"entry": np.array(entries, dtype=object)}
