"""Shards built from ``data.source`` (UTF-8 byte tokens), in ``data.path`` or the service's shard cache.

Layout of the folder::

    manifest.json                   written last (atomic replace): the set in use, and the set before it
    set-<key>/train-00000.parquet   columns: path (string), tokens (list<uint16>, ending with EOS)
    set-<key>/val-00000.parquet     held-out files, chosen by a hash of the relative path

Token 0 (NUL, which never occurs in a text file: files holding it are skipped as binary) marks the
end of each document, so packing is concatenate-and-cut.

The manifest records a fingerprint of the source (relative path, size, mtime of every file read),
so a second run reuses the shards and a changed corpus rebuilds them. Each shard's size, SHA-256 and
tokens are recorded; the training read task that reads a shard checks it (workers/data/reader.py),
and ``verify_shards`` checks them all at once for tools and tests.

One folder serves every job that names it, so a build never pulls files from under a running job:
the cache folder's key covers every setting that changes the shards (jobs that differ share
nothing); a rebuild writes a new set beside the one in use and switches by replacing
``manifest.json``, then deletes the set before that one (the manifest's ``retired`` list: a job that
started on the previous set keeps reading it). Only files a manifest of ours lists are ever deleted;
a folder holding parquet files but no manifest of ours is refused, never touched.

Confinement (workers/confine.py): a corpus file or folder linked out of the job's data roots is
skipped and counted, never read; a shard or manifest linked out is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers import confine
from workers.config import VOCAB_SIZE, DataConfig
from workers.confine import OutsideRoots
from workers.data.manifest import inside, sha256_hex, sha256_of
from workers.data.sources import is_val

EOS_TOKEN = 0
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# 2: every file entry lists its tokens (the training reader plans from them); a set without is rebuilt.
LAYOUT = 2
# Folders never read from a corpus: installed packages (not the stdlib's own code) and caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules", ".git"})
SPLITS = ("train", "val")
SET_PREFIX = "set-"


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
    key = repr((str(source_dir(cfg)), cfg.extensions, cfg.max_bytes, cfg.val_fraction, cfg.shard_tokens))
    return cache / hashlib.sha256(key.encode()).hexdigest()[:16]


def service_roots(cfg: DataConfig) -> tuple[str, ...]:
    """Folders the service chose for this job, which a confined job may use outside its roots: the
    default corpus (the stdlib) when data.source is unset, the shard cache when data.path is."""
    return ((*(() if cfg.source else (str(source_dir(cfg)),)),
             *(() if cfg.path else (str(shards_dir(cfg)),))))


def _corpus_files(src: Path, extensions: tuple[str, ...],
                  roots: confine.Confinement | None) -> Iterator[tuple[str, Path | None]]:
    """(relative path, path) of every matching file, in a stable order; the path is None for a file
    whose real path lies outside ``roots`` (a link out of them: skipped, never read)."""
    for root, dirs, files in os.walk(src):  # a linked folder is listed in dirs, never walked
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(extensions):
                path = Path(root) / name
                yield str(path.relative_to(src)), None if roots and not roots.allows(path) else path


def _write_atomic(path: Path, data: bytes, also: tuple[str, ...]) -> None:
    """``path`` absent or complete: written beside and renamed over, so a job reading the old file
    keeps reading it whole. Under the job's roots: a folder linked out of them is refused (DataError
    naming it) before anything is created."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        confine.check(path.parent, "folder", also=also)
        path.parent.mkdir(parents=True, exist_ok=True)
        with confine.open_file(tmp, "wb", also=also) as f:
            f.write(data)
    except OutsideRoots as e:
        raise DataError(f"data.path: {e}") from None
    os.replace(tmp, path)


class _ShardWriter:
    """Accumulates documents of one split and writes a parquet shard every `shard_tokens` tokens."""

    def __init__(self, out: Path, folder: str, split: str, shard_tokens: int, also: tuple[str, ...]):
        self.out, self.folder, self.split, self.shard_tokens, self.also = out, folder, split, shard_tokens, also
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
        name = f"{self.folder}/{self.split}-{len(self.files):05d}.parquet"
        offsets = np.zeros(len(self.docs) + 1, dtype=np.int32)
        np.cumsum([len(d) for d in self.docs], out=offsets[1:])
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(self.docs)))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"path": pa.array(self.paths, pa.string()), "tokens": tokens}), sink,
                       compression="zstd")
        data = sink.getvalue().to_pybytes()
        _write_atomic(self.out / name, data, self.also)
        self.files.append({"name": name, "bytes": len(data), "sha256": sha256_hex(data),
                           "documents": len(self.docs), "tokens": self.pending})
        self.paths, self.docs, self.pending = [], [], 0


def _links(count: int) -> str:
    return f"; skipped {count} file{'s' * (count != 1)} linked outside the data roots" if count else ""


def _read_text(path: Path, roots: confine.Confinement | None) -> bytes | None:
    """The file's bytes, opened under ``roots``; None when it was linked out of them since the listing."""
    try:
        with (roots.open(path) if roots else open(path, "rb")) as f:
            return f.read()
    except OutsideRoots:
        return None


def build_shards(cfg: DataConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize the corpus into parquet shards unless an up-to-date manifest is already there."""
    src = source_dir(cfg)
    out = shards_dir(cfg)
    also = service_roots(cfg)
    roots = confine.from_env()
    roots = roots and roots.with_roots(*also)
    entries, total, linked_out = [], 0, 0
    for rel, path in _corpus_files(src, cfg.extensions, roots):
        if path is None:
            linked_out += 1
            continue
        st = path.stat()
        if cfg.max_bytes is not None and total + st.st_size > cfg.max_bytes and entries:
            break
        entries.append((rel, path, st.st_size, st.st_mtime_ns))
        total += st.st_size
    if not entries:
        raise DataError(f"data.source: no files ending in {', '.join(cfg.extensions)} under {src}{_links(linked_out)}")
    fingerprint = hashlib.sha256(repr([(r, s, m) for r, _, s, m in entries]).encode()).hexdigest()
    settings = {"source": str(src), "fingerprint": fingerprint, "extensions": list(cfg.extensions),
                "max_bytes": cfg.max_bytes, "val_fraction": cfg.val_fraction,
                "shard_tokens": cfg.shard_tokens, "tokenizer": "utf8-bytes", "vocab_size": VOCAB_SIZE,
                "layout": LAYOUT}
    existing = read_manifest(out, missing_ok=True, also=also)
    if existing and all(existing.get(k) == v for k, v in settings.items()):
        log(f"data: reusing {sum(len(existing['splits'][s]['files']) for s in SPLITS)} shards in {out}")
        return existing
    if existing is None and out.is_dir() and any(out.glob("*.parquet")):
        raise DataError(f"data.path: {out} holds parquet files but no {MANIFEST} written by this service; they "
                        f"are left untouched: name a new folder to build shards from data.source, or prepare "
                        f"this one with `python -m jobs.prepare`")

    folder = SET_PREFIX + hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    log(f"data: tokenizing {len(entries)} files ({total / 1e6:.1f} MB) from {src} into {out / folder}"
        f"{_links(linked_out)}")
    val_forced = cfg.val_fraction > 0 and len(entries) > 1 and not any(is_val(r, cfg.val_fraction) for r, *_ in entries)
    if val_forced:  # tiny corpus: hold out at least its last file so eval has data
        forced = entries[-1][0]
    writers = {s: _ShardWriter(out, folder, s, cfg.shard_tokens, also) for s in SPLITS}
    skipped = 0
    for i, (rel, path, _, _) in enumerate(entries, 1):
        raw = _read_text(path, roots)
        if raw is None:
            linked_out += 1
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if b"\x00" in raw or not raw:
            skipped += 1
            continue
        tokens = np.frombuffer(raw + bytes([EOS_TOKEN]), dtype=np.uint8).astype(np.uint16)  # (len+1,)
        held_out = (rel == forced) if val_forced else is_val(rel, cfg.val_fraction)
        writers["val" if held_out else "train"].add(rel, tokens)
        if i % 500 == 0:
            log(f"data: {i}/{len(entries)} files")
    for w in writers.values():
        w.flush()
    if not writers["train"].files:
        raise DataError(f"data.source: no readable text files under {src} (skipped {skipped} binary files)")
    new = {f["name"] for w in writers.values() for f in w.files}
    in_use = [] if existing is None else [f["name"] for s in SPLITS for f in existing["splits"][s]["files"]]
    manifest = {"version": MANIFEST_VERSION, **settings, "skipped_binary": skipped, "skipped_links": linked_out,
                "splits": {s: {"files": w.files, "tokens": w.tokens, "documents": w.documents}
                           for s, w in writers.items()},
                "retired": sorted(set(in_use) - new)}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode(), also)  # the switch
    if existing is not None:
        _remove_listed(out, set(existing.get("retired", ())) - new - set(in_use), also)
    manifest.update(root=str(out), allowed=list(also))
    log(f"data: {writers['train'].tokens / 1e6:.1f}M train tokens, {writers['val'].tokens / 1e6:.2f}M val tokens "
        f"in {sum(len(w.files) for w in writers.values())} shards (skipped {skipped} binary files){_links(linked_out)}")
    return manifest


def _remove_listed(out: Path, names: set[str], also: tuple[str, ...]) -> None:
    """Delete these files a manifest of ours listed (relative names, checked by read_manifest), and
    their set folders once empty; a file whose folder is linked out of the roots is left alone."""
    for name in sorted(names):
        path = out / name
        try:
            confine.check(path.parent, "folder", also=also)
            path.unlink(missing_ok=True)
            if path.parent != out and path.parent.name.startswith(SET_PREFIX) and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError:  # OutsideRoots, or another builder's file appearing: the next build retries
            continue


def read_manifest(out: Path, missing_ok: bool = False, also: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The manifest of ``out`` (checked: every file it names lies inside ``out``), or None when there
    is none and ``missing_ok``. Raises DataError naming the file."""
    path = out / MANIFEST
    try:
        with confine.open_file(path, "rb", also=also) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"data.path: no {MANIFEST} in {out}; the shards were never built there") from None
    except OutsideRoots as e:
        raise DataError(f"data.path: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: {path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"data.path: {path} has an unknown manifest version; it was not written by this "
                        f"service's shard builder: name a new folder, or prepare one with `python -m jobs.prepare`")
    try:
        names = [f["name"] for s in SPLITS for f in manifest["splits"][s]["files"]] + list(manifest.get("retired", ()))
    except (KeyError, TypeError) as e:
        raise DataError(f"data.path: {path} is corrupt: no {e}") from None
    for name in names:
        if not isinstance(name, str) or not inside(name):
            raise DataError(f"data.path: {path} lists {name!r}, outside {out} (absolute, or with '..'); refused")
    manifest.update(root=str(out), allowed=list(also))
    return manifest


def verify_shards(manifest: dict[str, Any]) -> None:
    """Check every shard's size, checksum and parquet footer; raise DataError naming a bad file
    (or one linked out of the job's data roots)."""
    root = Path(manifest["root"])
    for entry in (e for s in SPLITS for e in manifest["splits"][s]["files"]):
        path = root / entry["name"]
        try:
            f = confine.open_file(path, "rb", also=manifest.get("allowed", ()))
        except FileNotFoundError:
            raise DataError(f"shard {path} is missing (listed in {root / MANIFEST})") from None
        except OutsideRoots as e:
            raise DataError(f"shard {path}: {e}") from None
        with f:
            digest = sha256_of(f)
            if f.tell() != entry["bytes"] or digest != entry["sha256"]:
                raise DataError(f"shard {path} is corrupt: its size or checksum differs from {root / MANIFEST}; "
                                f"delete {root} to rebuild")
            try:
                pq.read_metadata(f)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"shard {path} is corrupt: {e}") from None


def shard_paths(manifest: dict[str, Any], split: str) -> list[str]:
    root = Path(manifest["root"])
    return [str(root / e["name"]) for e in manifest["splits"][split]["files"]]
