"""Corpus -> byte tokens -> parquet shards; Ray Data streaming, packing and per-worker shards.

Tokenizer: UTF-8 bytes (vocab 256). Token 0 (NUL, which never occurs in a text file: files holding
it are skipped as binary) marks the end of each document, so packing is concatenate-and-cut.

Layout of ``data.path``::

    manifest.json            written last: its presence means the shards are complete
    train-00000.parquet ...  columns: path (string), tokens (list<uint16>, ending with EOS)
    val-00000.parquet ...    held-out files, chosen by a hash of the relative path

The manifest records a fingerprint of the source (relative path, size, mtime of every file read),
so a second run reuses the shards and a changed corpus rebuilds them. Each shard's size and SHA-256
are recorded and checked before training, so a corrupt shard is named before any Ray work starts.

A prepared dataset (``python -m jobs.prepare``: a local folder or ``s3://`` prefix holding a
version-2 manifest, workers/corpus/manifest.py) is read instead when ``data.path`` names one:
exactly the shards its manifest lists, checked first (``data.on_corrupt``), with its tokenizer.
``open_training_data`` returns either as one ``TrainingData``.

Order (exactly once): every rank streams the whole training split in ONE order that depends on
neither the world size nor the batch size: the files in a seeded order (the same at every
execution, Ray Data's preserve_order), each packed on its own (workers/shard_reader.py), cut
into windows, each permuted by a generator seeded with (seed, epoch, window) (workers/order.py).
A sequence is thus named by (epoch, index in the epoch); the loop cuts its rows out of each
global batch and the checkpoint stores the index reached, so a resume on any world size
continues at exactly the next sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.config import VOCAB_SIZE, DataConfig
from workers.tokenizer import ByteTokenizer, Tokenizer

EOS_TOKEN = 0
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Folders never read from a corpus: installed packages (not the stdlib's own code) and caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules", ".git"})
SPLITS = ("train", "val")
# Rows permuted together in the training order (module docstring): a fixed unit, so the order does
# not depend on the batch size or the world size; 1024 rows of 129 uint16 tokens are ~0.3 MB.
# The S3 settings Ray Data's read tasks and the Train workers need (workers on other nodes do not
# inherit the driver's environment); only those set on the driver are passed.
S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class DataError(RuntimeError):
    """Missing corpus, empty corpus or a corrupt shard; the message names the folder or file."""


def source_dir(cfg: DataConfig) -> Path:
    src = Path(cfg.source).expanduser() if cfg.source else Path(sysconfig.get_paths()["stdlib"])
    if not src.is_dir():
        raise DataError(f"data.source: folder {src} does not exist")
    return src.resolve()


def shards_dir(cfg: DataConfig) -> Path:
    if cfg.path:
        if "://" in cfg.path:
            raise DataError(f"data.path: {cfg.path!r}: a URI must name a prepared dataset "
                            "(python -m jobs.prepare); only local folders are built from data.source")
        return Path(cfg.path).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-orch" / "shards"
    key = hashlib.sha256(repr((str(source_dir(cfg)), cfg.extensions, cfg.max_bytes, cfg.val_fraction)).encode())
    return cache / key.hexdigest()[:16]


def _corpus_files(src: Path, extensions: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every matching file, in a stable order."""
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(extensions):
                path = Path(root) / name
                yield str(path.relative_to(src)), path


def _is_val(rel: str, val_fraction: float) -> bool:
    return zlib.crc32(rel.encode()) % 10_000 < val_fraction * 10_000


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    """Accumulates documents of one split and writes a parquet shard every `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.paths: list[str] = []
        self.docs: list[np.ndarray] = []
        self.pending = 0
        self.files: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, rel: str, tokens: np.ndarray) -> None:
        self.paths.append(rel)
        self.docs.append(tokens)
        self.pending += len(tokens)
        self.tokens += len(tokens)
        self.documents += 1
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        name = f"{self.split}-{len(self.files):05d}.parquet"
        offsets = np.zeros(len(self.docs) + 1, dtype=np.int32)
        np.cumsum([len(d) for d in self.docs], out=offsets[1:])
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(self.docs)))
        table = pa.table({"path": pa.array(self.paths, pa.string()), "tokens": tokens})
        pq.write_table(table, self.out / name, compression="zstd")
        self.files.append({"name": name, "bytes": (self.out / name).stat().st_size,
                           "sha256": _sha256(self.out / name), "documents": len(self.docs)})
        self.paths, self.docs, self.pending = [], [], 0


def build_shards(cfg: DataConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize the corpus into parquet shards unless an up-to-date manifest is already there."""
    src = source_dir(cfg)
    out = shards_dir(cfg)
    entries = []
    total = 0
    for rel, path in _corpus_files(src, cfg.extensions):
        st = path.stat()
        if cfg.max_bytes is not None and total + st.st_size > cfg.max_bytes and entries:
            break
        entries.append((rel, path, st.st_size, st.st_mtime_ns))
        total += st.st_size
    if not entries:
        raise DataError(f"data.source: no files ending in {', '.join(cfg.extensions)} under {src}")
    fingerprint = hashlib.sha256(repr([(r, s, m) for r, _, s, m in entries]).encode()).hexdigest()
    settings = {"source": str(src), "fingerprint": fingerprint, "extensions": list(cfg.extensions),
                "max_bytes": cfg.max_bytes, "val_fraction": cfg.val_fraction,
                "shard_tokens": cfg.shard_tokens, "tokenizer": "utf8-bytes", "vocab_size": VOCAB_SIZE}
    existing = read_manifest(out, missing_ok=True)
    if existing and all(existing.get(k) == v for k, v in settings.items()):
        log(f"data: reusing {sum(len(existing['splits'][s]['files']) for s in SPLITS)} shards in {out}")
        return existing

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob("*.parquet"):
        stale.unlink()
    log(f"data: tokenizing {len(entries)} files ({total / 1e6:.1f} MB) from {src} into {out}")
    val_forced = cfg.val_fraction > 0 and len(entries) > 1 and not any(_is_val(r, cfg.val_fraction) for r, *_ in entries)
    if val_forced:  # tiny corpus: hold out at least its last file so eval has data
        forced = entries[-1][0]
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens) for s in SPLITS}
    skipped = 0
    for i, (rel, path, _, _) in enumerate(entries, 1):
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if b"\x00" in raw or not raw:
            skipped += 1
            continue
        tokens = np.frombuffer(raw + bytes([EOS_TOKEN]), dtype=np.uint8).astype(np.uint16)  # (len+1,)
        is_val = (rel == forced) if val_forced else _is_val(rel, cfg.val_fraction)
        writers["val" if is_val else "train"].add(rel, tokens)
        if i % 500 == 0:
            log(f"data: {i}/{len(entries)} files")
    for w in writers.values():
        w.flush()
    if not writers["train"].files:
        raise DataError(f"data.source: no readable text files under {src} (skipped {skipped} binary files)")
    manifest = {"version": MANIFEST_VERSION, **settings, "skipped_binary": skipped,
                "splits": {s: {"files": w.files, "tokens": w.tokens, "documents": w.documents}
                           for s, w in writers.items()}}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    manifest["root"] = str(out)
    log(f"data: {writers['train'].tokens / 1e6:.1f}M train tokens, {writers['val'].tokens / 1e6:.2f}M val tokens "
        f"in {sum(len(w.files) for w in writers.values())} shards (skipped {skipped} binary files)")
    return manifest


def read_manifest(out: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"data.path: no {MANIFEST} in {out}; the shards were never built there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if missing_ok:
            return None
        raise DataError(f"data.path: {out / MANIFEST} is corrupt: {e}") from None
    if manifest.get("version") != MANIFEST_VERSION:
        if missing_ok:
            return None
        raise DataError(f"data.path: {out / MANIFEST} has an unknown manifest version")
    manifest["root"] = str(out)
    return manifest


def verify_shards(manifest: dict[str, Any]) -> None:
    """Check every shard's size, checksum and parquet footer; raise DataError naming a bad file."""
    root = Path(manifest["root"])
    for split in SPLITS:
        for entry in manifest["splits"][split]["files"]:
            path = root / entry["name"]
            if not path.is_file():
                raise DataError(f"shard {path} is missing (listed in {root / MANIFEST})")
            if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                raise DataError(f"shard {path} is corrupt: its size or checksum differs from {root / MANIFEST}; "
                                f"delete {root} to rebuild")
            try:
                pq.read_metadata(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"shard {path} is corrupt: {e}") from None


def shard_paths(manifest: dict[str, Any], split: str) -> list[str]:
    root = Path(manifest["root"])
    return [str(root / e["name"]) for e in manifest["splits"][split]["files"]]


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: the verified shards of each split (paths inside ``filesystem``), the
    tokenizer that made them (stored in every checkpoint) and the shards left out as corrupt."""

    shards: dict[str, list[str]]
    filesystem: pafs.FileSystem
    tokenizer: Tokenizer
    location: str  # the folder or s3:// prefix, for messages
    skipped: list[str] = field(default_factory=list)  # "URI: reason" (data.on_corrupt: skip)

    @classmethod
    def from_built(cls, manifest: dict[str, Any]) -> TrainingData:
        """The shards ``build_shards`` made from ``data.source`` (byte tokens, local)."""
        return cls({s: shard_paths(manifest, s) for s in SPLITS}, pafs.LocalFileSystem(), ByteTokenizer(),
                   manifest["root"])


def _is_prepared(path: str) -> bool:
    """``path`` holds a jobs.prepare manifest (an s3:// prefix can hold nothing else)."""
    from workers.corpus.manifest import CorpusError, load_manifest

    if path.startswith("s3://"):
        return True
    if "://" in path and not path.startswith("file://"):
        return False  # shards_dir names the scheme in its error
    try:
        root = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        return load_manifest(pafs.LocalFileSystem(), root, missing_ok=True) is not None
    except CorpusError as e:
        raise DataError(f"data.path: {e}") from None


def open_training_data(cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print) -> TrainingData:
    """The data of a run, checked before any Ray work: a prepared dataset when ``data.path`` holds
    one (every listed shard's size and SHA-256; a bad one fails naming the file, or with
    ``data.on_corrupt: skip`` is left out and logged), else shards built from ``data.source``.
    ``vocab_size`` (the model's) must cover the tokenizer's ids. Raises DataError."""
    from workers.corpus.manifest import CorpusError, open_prepared
    from workers.storage import StorageError

    if cfg.path and _is_prepared(cfg.path):
        try:
            prepared = open_prepared(cfg.path, on_corrupt=cfg.on_corrupt)
        except (CorpusError, StorageError) as e:
            raise DataError(f"data.path: {e}") from None
        for line in prepared.skipped:
            log(f"data: skipping corrupt shard {line}")
        data = TrainingData({s: prepared.paths(s) for s in SPLITS}, prepared.filesystem, prepared.tokenizer,
                            cfg.path, prepared.skipped)
        log(f"data: {prepared.tokens['train'] / 1e6:.1f}M train tokens in {len(data.shards['train'])} shards "
            f"of {cfg.path} ({data.tokenizer.kind} tokenizer, vocab {data.tokenizer.vocab_size})")
    else:
        manifest = build_shards(cfg, log)
        verify_shards(manifest)
        data = TrainingData.from_built(manifest)
    if vocab_size < data.tokenizer.vocab_size:
        raise DataError(f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of {data.location}'s "
                        f"{data.tokenizer.kind} tokenizer ({data.tokenizer.vocab_size}): set model.vocab_size "
                        f">= {data.tokenizer.vocab_size}")
    return data


def s3_env() -> dict[str, str]:
    """The driver's S3 settings (S3_ENV_VARS that are set), for the runtime_env of remote work."""
    return {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}


def make_datasets(data: TrainingData, cfg: DataConfig, seed: int) -> dict[str, Any]:
    """Ray Data streaming pipelines of packed rows (workers/shard_reader.py): the shards the manifest
    lists, read ``cfg.read_tasks`` at a time; the training split's shards in one order seeded by
    ``seed`` (the same at every execution: every epoch, every worker-group start). With Ray Data's
    preserve_order (jobs/trainer.py) the rows then arrive in one order, which workers/order.py's
    ``ordered_rows`` shuffles deterministically."""
    import ray.data

    from workers.shard_reader import ShardSource

    env = s3_env()
    runtime_env = {"env_vars": env} if env else None
    datasets = {}
    for split in SPLITS:
        paths = data.shards.get(split)
        if not paths:
            continue
        if split == "train":
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
        # One block stream per shard: override_num_blocks keeps Ray from splitting them further.
        datasets[split] = ray.data.read_datasource(ShardSource(paths, data.filesystem, cfg.seq_len),
                                                   concurrency=cfg.read_tasks, override_num_blocks=len(paths),
                                                   runtime_env=runtime_env)
    return datasets
