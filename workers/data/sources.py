"""What a preparation will do, decided before any work starts: the input files, their split, and a
deterministic assignment of files to shards.

The assignment depends only on the listing and the config, so a rerun after an interruption plans
the same shards under the same names and finds the finished ones by their done-records. The
fingerprint (listing + every setting that changes a shard's content) names the staging prefix:
a changed corpus or config gets a fresh one and never mixes with shards of another plan.

A local file whose real path lies outside the job's data roots (a link out of them; see
workers/confine.py) is left out of the listing and counted, and checked again when it is opened.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass

import pyarrow.fs as pafs

from workers import confine
from workers.confine import OutsideRoots
from workers.data.manifest import MANIFEST_VERSION, CorpusError
from workers.data.prepare_config import PrepareConfig
from workers.data.storage import join, open_small_fs, read_bytes, uri_of, where, with_retries

# Folders never read from a corpus: installed packages (not the stdlib's own code) and caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules", ".git"})
# Bytes read from the start of a file to tell text from binary before any work starts.
SNIFF_BYTES = 4096


@dataclass(frozen=True)
class SourceFile:
    rel: str  # path relative to the source root, "/"-separated
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardPlan:
    name: str  # "train-00003": the shard file is <name>.parquet, its done-record <name>.done.json
    split: str
    files: tuple[str, ...]  # relative paths, in listing order
    input_bytes: int


@dataclass(frozen=True)
class Plan:
    source: str  # URI of the source root (a folder or s3:// prefix)
    files: tuple[SourceFile, ...]
    shards: tuple[ShardPlan, ...]
    fingerprint: str

    @property
    def input_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def shard_dir(self) -> str:
        """The staging prefix, relative to the output root."""
        return f"shards-{self.fingerprint[:16]}"


def is_text(raw: bytes) -> bool:
    """UTF-8 without NUL (token 0 is the end-of-document mark); a truncated multi-byte character at
    the end of a sniffed prefix still counts as text."""
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return len(raw) == SNIFF_BYTES and e.start >= len(raw) - 3
    return True


def is_val(rel: str, val_fraction: float) -> bool:
    return zlib.crc32(rel.encode()) % 10_000 < val_fraction * 10_000


def source_uri(cfg: PrepareConfig) -> str:
    return cfg.source or sysconfig.get_paths()["stdlib"]


def service_roots(source: str) -> tuple[str, ...]:
    """Folders a confined job may read outside its data roots: the default corpus, the running
    Python's standard library (no team's data), when it is ``source``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return (stdlib,) if os.path.realpath(source) == os.path.realpath(stdlib) else ()


def list_source(cfg: PrepareConfig) -> tuple[pafs.FileSystem, str, list[SourceFile], int]:
    """The files to read, in a stable order, capped at ``max_bytes``, and how many matching files
    were left out as links out of the job's data roots. Raises CorpusError when none match the
    extensions; StorageError when the source cannot be reached or does not exist."""
    src = source_uri(cfg)
    fs, root = open_small_fs(src, must_exist=True)  # a listing and small reads: s3fs on S3
    infos = with_retries(f"cannot list {where(src)}",
                         lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True)))
    roots = confine.from_env() if isinstance(fs, pafs.LocalFileSystem) else None
    roots = roots and roots.with_roots(*service_roots(root))
    files, total, linked_out = [], 0, 0
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = info.path[len(root):].lstrip("/")
        parts = rel.split("/")
        if any(p in SKIP_DIRS or p.startswith(".") for p in parts[:-1]) or not rel.endswith(cfg.extensions):
            continue
        if roots is not None and not roots.allows(info.path):  # a link (or a linked folder) out: never read
            linked_out += 1
            continue
        if cfg.max_bytes is not None and files and total + info.size > cfg.max_bytes:
            break
        files.append(SourceFile(rel, info.size, info.mtime_ns or 0))
        total += info.size
    if not files:
        raise CorpusError(f"source {where(src)}: no files ending in {', '.join(cfg.extensions)}"
                          + (f" (skipped {linked_out} linked outside the data roots)" if linked_out else ""))
    return fs, root, files, linked_out


def require_text(fs: pafs.FileSystem, root: str, files: list[SourceFile]) -> None:
    """Raise CorpusError unless some file starts as text (a folder of binaries fails here, before
    any work). Files are sniffed in order and the first text file ends the check, so a usual corpus
    costs one small read."""
    for f in files:
        try:
            head = read_head(fs, root, f.rel)
        except OutsideRoots:  # linked out after the listing: never read
            continue
        if f.size and is_text(head):
            return
    raise CorpusError(f"source {uri_of(fs, root)}: none of its {len(files)} matching files is UTF-8 text "
                      f"(each holds NUL or invalid UTF-8, or is empty)")


def read_head(fs: pafs.FileSystem, root: str, rel: str) -> bytes:
    """The first SNIFF_BYTES of a source file, opened under the job's roots if it is local."""
    path = join(root, rel)
    if isinstance(fs, pafs.LocalFileSystem):
        with confine.open_file(path, "rb", also=service_roots(root)) as h:
            return h.read(SNIFF_BYTES)
    with fs.open_input_file(path) as h:
        return h.read(SNIFF_BYTES)


def make_plan(cfg: PrepareConfig, fs: pafs.FileSystem, root: str, files: list[SourceFile]) -> Plan:
    """Split files by a hash of their path, then group consecutive files into shards of about
    ``shard_bytes`` input bytes. With ``val_fraction`` > 0, a corpus whose hash puts no file in
    val holds out its last file, so evaluation has data."""
    val = {f.rel for f in files if is_val(f.rel, cfg.val_fraction)}
    if cfg.val_fraction > 0 and not val and len(files) > 1:
        val = {files[-1].rel}
    shards: list[ShardPlan] = []
    for split in ("train", "val"):
        group: list[SourceFile] = []
        for f in [f for f in files if (f.rel in val) == (split == "val")] + [None]:
            if group and (f is None or sum(g.size for g in group) + f.size > cfg.shard_bytes):
                index = sum(s.split == split for s in shards)
                shards.append(ShardPlan(f"{split}-{index:05d}", split, tuple(g.rel for g in group),
                                        sum(g.size for g in group)))
                group = []
            if f is not None:
                group.append(f)
    settings = cfg.model_dump(mode="json", exclude={"path", "source"})
    key = repr((MANIFEST_VERSION, uri_of(fs, root), settings, [(f.rel, f.size, f.mtime_ns) for f in files]))
    return Plan(uri_of(fs, root), tuple(files), tuple(shards), hashlib.sha256(key.encode()).hexdigest())


def bpe_sample(fs: pafs.FileSystem, root: str, plan: Plan, sample_bytes: int) -> list[str]:
    """Texts of train files spread evenly over the listing, about ``sample_bytes`` in all."""
    train = [f for s in plan.shards if s.split == "train" for f in s.files]
    sizes = {f.rel: f.size for f in plan.files}
    total = sum(sizes[r] for r in train)
    step = max(1, round(total / sample_bytes)) if total > sample_bytes else 1
    texts, taken = [], 0
    also = service_roots(root)
    for rel in train[::step]:
        try:
            raw = with_retries(f"cannot read {uri_of(fs, join(root, rel))}",
                               lambda r=rel: read_bytes(fs, join(root, r), also=also))
        except OutsideRoots:  # linked out after the listing: never read
            continue
        if is_text(raw):
            texts.append(raw.decode("utf-8"))
            taken += len(raw)
        if taken >= sample_bytes:
            break
    return texts
