"""Shards built from ``data.source`` for a run that names no prepared dataset: the preparation of
``python -m jobs.prepare`` (workers/data/prepare.py) with the byte tokenizer (UTF-8 bytes, vocab 256),
written to ``data.path`` or the service's shard cache, under the one manifest format
(workers/data/manifest.py; its ``origin`` is ``data.source``).

A small corpus (at most IN_PROCESS_MAX_BYTES left to build) is prepared in this process; a larger
one as Ray Data tasks when this process is connected to Ray (``jobs.train`` reads its data first:
there the build stays in process unless Ray was started before).

The manifest's fingerprint covers the source listing (path, size, mtime of every file) and every
setting, so a second run reuses the shards and a changed corpus rebuilds them. The cache folder's
key covers every setting that changes the shards (jobs that differ share nothing); a rebuild in one
folder writes a new set beside the one in use, switches by replacing ``manifest.json`` and deletes
only the set before that one (the manifest's ``retired``), so a running job keeps its files.

Refused, never touched: a folder holding parquet files but no manifest, a manifest of an unknown
format, a dataset prepared by ``jobs.prepare`` (trained on as it is, never rebuilt from here). A
version-1 manifest (the builder before this one) is read once more: the rebuild lists its files as
retired, deleted by the rebuild after.

Confinement (workers/confine.py): a corpus file or folder linked out of the job's data roots is
skipped and counted, never read; a shard or manifest linked out is refused, naming it. The cache
folder and the default corpus (the stdlib) are the service's: a confined job uses them outside its
roots.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workers import confine
from workers.config import DataConfig
from workers.confine import ROOTS_ENV, OutsideRoots
from workers.data.manifest import MANIFEST, MANIFEST_FORMAT, SPLITS, CorpusError, inside, is_version_1
from workers.data.prepare import prepare, ray_runner, run_in_process
from workers.data.prepare_config import PrepareConfig
from workers.data.sources import ShardPlan
from workers.data.storage import StorageError

# Input bytes left to build above which the shards are built as Ray Data tasks (when connected).
IN_PROCESS_MAX_BYTES = 64 * 1024 * 1024
ORIGIN = "data.source"


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


def prepare_config(cfg: DataConfig) -> PrepareConfig:
    """The preparation ``cfg`` asks for: byte tokens, one document per row, ``shard_tokens`` input
    bytes per shard (a byte is a token)."""
    return PrepareConfig(source=str(source_dir(cfg)), path=str(shards_dir(cfg)), extensions=cfg.extensions,
                         max_bytes=cfg.max_bytes, val_fraction=cfg.val_fraction, shard_bytes=cfg.shard_tokens)


@contextmanager
def widened_roots(also: tuple[str, ...]) -> Iterator[None]:
    """The job's data roots (if confined) widened by the service's folders ``also`` while the block
    runs: every open in this process checks ORCH_DATA_ROOTS, and shard tasks inherit it."""
    roots = confine.from_env()
    if roots is None or not also:
        yield
        return
    before = os.environ[ROOTS_ENV]
    os.environ[ROOTS_ENV] = confine.env_value((*roots.roots, *also))
    try:
        yield
    finally:
        os.environ[ROOTS_ENV] = before


def _runner(shards: list[ShardPlan], **kw: Any) -> Iterator[Any]:
    """In this process, or as Ray Data tasks for more than IN_PROCESS_MAX_BYTES when Ray is up."""
    large = sum(s.input_bytes for s in shards) > IN_PROCESS_MAX_BYTES and len(shards) > 1
    if large:
        import ray

        large = ray.is_initialized()
    yield from (ray_runner() if large else run_in_process)(shards, **kw)


def _version_1_files(path: Path, obj: dict[str, Any]) -> tuple[str, ...]:
    """The files a version-1 manifest lists (its shards and its retired ones), each inside its folder."""
    try:
        names = [f["name"] for s in SPLITS for f in obj["splits"][s]["files"]] + list(obj.get("retired", ()))
    except (KeyError, TypeError) as e:
        raise DataError(f"data.path: {path} is corrupt: no {e}") from None
    for name in names:
        if not isinstance(name, str) or not inside(name):
            raise DataError(f"data.path: {path} lists {name!r}, outside {path.parent} (absolute, or with '..'); "
                            f"refused")
    return tuple(names)


def check_folder(out: Path) -> tuple[str, ...]:
    """Refuse a folder a build from data.source must not write to (naming the file); returns the
    files of a version-1 manifest there (empty otherwise), which the rebuild retires."""
    path = out / MANIFEST
    try:
        with confine.open_file(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        if out.is_dir() and any(out.glob("*.parquet")):
            raise DataError(f"data.path: {out} holds parquet files but no {MANIFEST} written by this service; "
                            f"they are left untouched: name a new folder to build shards from data.source, or "
                            f"prepare this one with `python -m jobs.prepare`") from None
        return ()
    except OutsideRoots as e:
        raise DataError(f"data.path: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: {path} is corrupt: {e}") from None
    if is_version_1(obj):
        return _version_1_files(path, obj)
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise DataError(f"data.path: {path} has an unknown manifest version; it was not written by this "
                        f"service's shard builder: name a new folder, or prepare one with `python -m jobs.prepare`")
    if obj.get("origin", "jobs.prepare") != ORIGIN:
        raise DataError(f"data.path: {path} is a dataset prepared by `python -m jobs.prepare`; it is trained on "
                        f"as it is and never rebuilt from data.source")
    return ()


def build_from_source(cfg: DataConfig, log: Callable[[str], None] = print) -> Path:
    """Prepare ``data.source`` into ``data.path`` or the shard cache unless an up-to-date manifest
    is there; returns the folder. Raises DataError naming the folder or file."""
    out = shards_dir(cfg)
    with widened_roots(service_roots(cfg)):
        retire = check_folder(out)
        if retire:
            log(f"data: {out / MANIFEST} is a version-1 manifest; rebuilding {out} in the current format "
                f"(its {len(retire)} files are deleted by the rebuild after this one)")
        try:
            prepare(prepare_config(cfg), log, _runner, origin=ORIGIN, retire=retire)
        except OutsideRoots as e:
            raise DataError(f"data.path: {e}") from None
        except (CorpusError, StorageError) as e:
            raise DataError(f"data.source: {e}") from None
    return out
