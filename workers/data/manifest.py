"""The manifest of prepared shards and the one reader of it: ``open_prepared(path)``.

A shard entry lists its row groups (``RowGroupEntry``: rows, tokens, stored bytes, SHA-256 of the
tokens): the training read tasks read, verify and resume by row group. An entry without them comes
from an earlier preparation, whose shards were one row group each; they are read whole.

The manifest (``<path>/manifest.json``) is the commit point of a preparation: shards and the
tokenizer are written first under ``<path>/shards-<fingerprint>/`` (the staging prefix), the manifest
last, in one atomic write (local: rename; S3: one PUT). A reader reads only what a manifest lists,
after checking each file's size and SHA-256 against it, so a half-written or later damaged file is
never trained on: it is named in an error, or left out and counted (``on_corrupt="skip"``).

Every file a manifest names lies inside its folder or prefix: an entry that is absolute or climbs
out with ``..`` is refused, naming it, and a local file that is a link out of the job's data roots
(workers/confine.py) is refused before it is read.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.confine import OutsideRoots
from workers.data.storage import (
    confined,
    join,
    open_fs,
    read_bytes,
    small_view,
    uri_of,
    with_retries,
    write_bytes_atomic,
)
from workers.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "moe-orch-shards"
MANIFEST_VERSION = 2
SPLITS = ("train", "val")
COLUMNS = ("path", "tokens")  # path: string; tokens: list<uint16>, documents end with EOS (0)
# Shards checked at once when reading a manifest (each check is I/O: a HEAD, or a full read for SHA-256).
VERIFY_THREADS = 8
HASH_CHUNK_BYTES = 1 << 20


class CorpusError(RuntimeError):
    """A corpus, manifest or shard that cannot be used; the message names the file or prefix."""


class CorruptShardError(CorpusError):
    """A file listed in a manifest whose size, checksum or parquet footer does not match."""

    def __init__(self, uri: str, reason: str, manifest_uri: str):
        super().__init__(f"shard {uri} is corrupt: {reason} (listed in {manifest_uri}); "
                         f"rerun `python -m jobs.prepare` to rebuild it")
        self.uri = uri


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def inside(name: str) -> bool:
    """``name`` is a relative path that stays inside the folder it is relative to."""
    return not name.startswith("/") and ".." not in PurePosixPath(name).parts


class FileEntry(_Model):
    file: str = Field(min_length=1)  # relative to the manifest's folder
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("file")
    @classmethod
    def _inside(cls, name: str) -> str:
        if not inside(name):
            raise ValueError(f"entry {name!r} lies outside the manifest's folder (absolute, or with '..')")
        return name


class RowGroupEntry(_Model):
    """One row group of a shard: the unit a training read task reads, verifies and resumes in."""

    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    stored_bytes: int = Field(ge=0)  # its column chunks, compressed
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of its tokens, flattened, as little-endian uint16


class ShardEntry(FileEntry):
    split: Literal["train", "val"]
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)
    input_bytes: int = Field(ge=0)
    skipped_binary: int = Field(ge=0)
    skipped_links: int = Field(0, ge=0)  # files linked out of the job's data roots, never read
    # None: written before row groups were bounded; the shard is one row group, verified as a file.
    row_groups: list[RowGroupEntry] | None = None


class TokenizerEntry(FileEntry):
    kind: Literal["bytes", "bpe"]
    vocab_size: int = Field(ge=2)
    eos_id: int = Field(ge=0)


class SplitEntry(_Model):
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)
    shards: list[ShardEntry]


class Manifest(_Model):
    format: Literal["moe-orch-shards"] = MANIFEST_FORMAT
    version: Literal[2] = MANIFEST_VERSION
    created: str  # ISO 8601, UTC
    source: str
    fingerprint: str  # of the input listing and every setting that changes the shards
    shard_dir: str  # the staging prefix the shards were written to, relative to the manifest
    columns: tuple[str, ...] = COLUMNS
    pack_len: int | None
    tokenizer: TokenizerEntry
    input_files: int = Field(ge=0)
    input_bytes: int = Field(ge=0)
    skipped_binary: int = Field(ge=0)
    skipped_links: int = Field(0, ge=0)
    splits: dict[Literal["train", "val"], SplitEntry]
    spec: dict  # the PrepareConfig that made it
    # Who wrote it: ``python -m jobs.prepare`` (a dataset a train job reads as it is), or a train job
    # from its ``data.source`` (workers/data/cache.py: rebuilt when the corpus or a setting changes).
    origin: Literal["jobs.prepare", "data.source"] = "jobs.prepare"
    # Files of the manifest this one replaced (relative names): a job that started on them keeps
    # reading them; the preparation after this one deletes them (workers/data/prepare.py).
    retired: list[str] = []

    @field_validator("retired")
    @classmethod
    def _retired_inside(cls, names: list[str]) -> list[str]:
        for name in names:
            if not inside(name):
                raise ValueError(f"entry {name!r} lies outside the manifest's folder (absolute, or with '..')")
        return names

    def files(self) -> list[str]:
        """Every file it lists: the tokenizer and the shards."""
        return [self.tokenizer.file, *(e.file for s in SPLITS for e in self.splits[s].shards)]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(f: Any) -> str:
    """SHA-256 of what is left in the readable file ``f``, read in chunks."""
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK_BYTES):
        h.update(chunk)
    return h.hexdigest()


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return sha256_of(f)


def check_file(fs: pafs.FileSystem, path: str, entry: FileEntry, checksums: bool) -> str | None:
    """Why ``path`` differs from its manifest entry (missing, size, SHA-256), or None if it matches."""
    info = with_retries(f"cannot read {uri_of(fs, path)}", lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        return "missing"
    if info.size != entry.bytes:
        return f"{info.size} bytes, the manifest lists {entry.bytes}"
    if checksums:
        digest = with_retries(f"cannot read {uri_of(fs, path)}", lambda: _file_sha256(fs, path))
        if digest != entry.sha256:
            return f"SHA-256 {digest[:12]}.. differs from the manifest's {entry.sha256[:12]}.."
    return None


def is_version_1(obj: Any) -> bool:
    """A manifest of the shard builder before version 2 (``{"version": 1, "splits": {s: {"files":
    [{"name": ...}]}}}``): read only to migrate it (workers/data/cache.py)."""
    return isinstance(obj, dict) and obj.get("version") == 1 and "format" not in obj


def load_manifest(fs: pafs.FileSystem, root: str, *, missing_ok: bool = False) -> Manifest | None:
    """The manifest under ``root`` (a path in ``fs``), or None when absent and ``missing_ok``."""
    path = join(root, MANIFEST)
    uri = uri_of(fs, path)
    info = with_retries(f"cannot read {uri}", lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        if missing_ok:
            return None
        raise CorpusError(f"no {MANIFEST} at {uri_of(fs, root)}: nothing was prepared there "
                          f"(run `python -m jobs.prepare`), or a preparation has not finished")
    try:
        raw = with_retries(f"cannot read {uri}", lambda: read_bytes(fs, path))
    except OutsideRoots as e:
        raise CorpusError(str(e)) from None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{uri} is corrupt: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT or obj.get("version") != MANIFEST_VERSION:
        if missing_ok:  # an older builder's manifest: this preparation replaces it
            return None
        if is_version_1(obj):
            raise CorpusError(f"{uri} is a version-1 manifest (shards a train job built from data.source before "
                              f"version 2): train once with data.path={uri_of(fs, root)} and the data.source it was "
                              f"built from to rebuild it in place, or run `python -m jobs.prepare --set "
                              f"path={uri_of(fs, root)}`")
        raise CorpusError(f"{uri} is not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT} manifest "
                          f"(written by another tool or version); rerun `python -m jobs.prepare`")
    try:
        return Manifest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise CorpusError(f"{uri} does not validate: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    """The commit: one atomic write, after every file it lists is complete."""
    write_bytes_atomic(fs, join(root, MANIFEST), manifest.model_dump_json(indent=1).encode())


@dataclass(frozen=True)
class PreparedData:
    """A verified preparation: what a trainer reads (``data.paths("train")`` inside ``data.filesystem``,
    workers/data/reader.py) and the tokenizer to train with."""

    root: str  # the data path as given: a folder or an s3:// prefix
    manifest: Manifest
    tokenizer: Tokenizer
    filesystem: pafs.FileSystem
    shards: dict[str, list[str]]  # split -> URIs of the verified shards (absolute path or s3://bucket/key)
    rows: dict[str, int]  # split -> rows in those shards
    tokens: dict[str, int]  # split -> tokens in those shards
    skipped: list[str] = field(default_factory=list)  # "URI: reason" per shard left out (on_corrupt=skip)
    base: str = ""  # the root as a path inside ``filesystem``

    def paths(self, split: str) -> list[str]:
        """The shards of ``split`` as paths inside ``filesystem`` (no scheme)."""
        return [u.removeprefix("s3://") for u in self.shards[split]]

    def path_of(self, entry: FileEntry) -> str:
        """A listed file's path inside ``filesystem``."""
        return join(self.base, entry.file)


def open_prepared(path: str, *, on_corrupt: Literal["fail", "skip"] = "fail",
                  checksums: bool = True, verify: bool = True) -> PreparedData:
    """Read ``path``'s manifest and check every file it lists (size always; SHA-256 and the parquet
    footer with ``checksums``). A mismatch raises CorruptShardError naming the file (``fail``), or
    leaves the shard out and records it in ``skipped`` (``skip``; the train split must keep at least
    one shard). ``verify=False`` checks no shard (training: each read task verifies what it reads,
    workers/data/reader.py). The tokenizer must always match: a model cannot train with the wrong one.
    Raises CorpusError (missing or unreadable manifest) or StorageError (unreachable location)."""
    fs, root = open_fs(path)  # pyarrow's client: the shards' reads (workers/data/storage.py)
    small = small_view(fs, path)  # s3fs on S3: the manifest and the tokenizer
    manifest = load_manifest(small, root)
    assert manifest is not None
    manifest_uri = uri_of(fs, join(root, MANIFEST))
    entries = [e for s in SPLITS for e in manifest.splits[s].shards]
    for listed in [manifest.tokenizer, *entries]:  # the job's own inputs: a link out is refused, not skipped
        try:
            confined(fs, join(root, listed.file))
        except OutsideRoots as e:
            raise CorpusError(f"{e} (listed in {manifest_uri})") from None

    tok_path = join(root, manifest.tokenizer.file)
    reason = check_file(small, tok_path, manifest.tokenizer, checksums=True)
    if reason:
        raise CorruptShardError(uri_of(fs, tok_path), reason, manifest_uri)
    try:
        tokenizer = load_tokenizer(read_bytes(small, tok_path).decode())
    except (TokenizerError, UnicodeDecodeError) as e:
        raise CorruptShardError(uri_of(fs, tok_path), str(e), manifest_uri) from None

    def check(entry: ShardEntry) -> str | None:
        shard = join(root, entry.file)
        reason = check_file(fs, shard, entry, checksums)
        if reason is None and checksums:
            try:
                if pq.read_metadata(shard, filesystem=fs).num_rows != entry.rows:
                    reason = f"its footer's row count differs from the manifest's {entry.rows}"
            except (pa.ArrowException, OSError) as e:
                reason = f"unreadable parquet: {e}"
        return reason

    if verify:
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            reasons = list(pool.map(check, entries))
    else:
        reasons = [None] * len(entries)
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    rows = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    skipped = []
    for entry, reason in zip(entries, reasons, strict=True):
        uri = uri_of(fs, join(root, entry.file))
        if reason is not None:
            if on_corrupt == "fail":
                raise CorruptShardError(uri, reason, manifest_uri)
            skipped.append(f"{uri}: {reason}")
            continue
        shards[entry.split].append(uri)
        rows[entry.split] += entry.rows
        tokens[entry.split] += entry.tokens
    if not shards["train"]:
        raise CorpusError(f"no usable train shard in {manifest_uri} ({len(skipped)} corrupt: {skipped[:3]})")
    return PreparedData(root=path, manifest=manifest, tokenizer=tokenizer, filesystem=fs, shards=shards,
                        rows=rows, tokens=tokens, skipped=skipped, base=root)


__all__ = ["CorpusError", "CorruptShardError", "Manifest", "PreparedData", "ShardEntry",
           "open_prepared"]
