"""Training data: a prepared dataset or shards built from ``data.source``, as one ``TrainingData``.

Both are one format (workers/data/manifest.py): a prepared dataset (``python -m jobs.prepare``: a
local folder or ``s3://`` prefix) is read as it is when ``data.path`` names one; otherwise the same
preparation runs on ``data.source`` into ``data.path`` or the service's shard cache
(workers/data/cache.py: byte tokens, reuse, what a rebuild may delete). Either way a run reads
exactly the shards the manifest lists, with its tokenizer. Nothing is scanned before training: a
row group (or a shard of an older preparation) is verified by the read task that reads it
(workers/data/reader.py).

The training split is read as canonical units, each by one worker, in an order that is a function
of (seed, epoch) (workers/data/order.py, workers/data/stream.py); ``plan("train", ...)`` is what
the workers get. The held-out split is read by the workers too (``plan("val", ...)``, each rank its
own units, workers/loop.py): no Ray Train dataset, so no dataset actors start with every worker group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.fs as pafs

from workers import confine
from workers.config import DataConfig
from workers.confine import OutsideRoots
from workers.data.cache import DataError, build_from_source, service_roots, widened_roots
from workers.data.manifest import SPLITS, CorpusError, Manifest, PreparedData, load_manifest, open_prepared
from workers.data.order import Unit
from workers.data.storage import StorageError, s3_env
from workers.data.stream import TrainPlan
from workers.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: the shards of each split (paths inside ``filesystem``), the training
    split's canonical units, the tokenizer that made them (stored in every checkpoint)."""

    shards: dict[str, list[str]]
    filesystem: pafs.FileSystem
    tokenizer: Tokenizer
    location: str  # the folder or s3:// prefix, for messages
    skipped: list[str] = field(default_factory=list)  # "URI: reason" (data.on_corrupt: skip)
    # Folders the service chose (the shard cache) that a confined job reads outside its data roots.
    allowed: tuple[str, ...] = ()
    units: dict[str, list[Unit]] = field(default_factory=dict)  # split -> its canonical units, manifest order
    manifest: Manifest | None = None

    def confinement(self) -> confine.Confinement | None:
        """Where the read tasks may open local shards (the job's roots and ``allowed``); None when
        the job is unconfined or its shards lie on S3 (no links there)."""
        roots = confine.from_env()
        if roots is None or not isinstance(self.filesystem, pafs.LocalFileSystem):
            return None
        return roots.with_roots(*self.allowed)

    def plan(self, split: str, cfg: DataConfig) -> TrainPlan:
        """A split as every worker reads it (no units for a split the dataset lacks)."""
        return TrainPlan(self.units.get(split, []), self.filesystem, cfg.seq_len, self.confinement(), cfg.on_corrupt,
                         s3_env() or None)


def _is_prepared(path: str) -> bool:
    """``path`` holds a jobs.prepare manifest (an s3:// prefix can hold nothing else); a folder
    holding one built from data.source is rebuilt from there when it is out of date."""
    if path.startswith("s3://"):
        return True
    if "://" in path and not path.startswith("file://"):
        return False  # shards_dir names the scheme in its error
    try:
        root = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        manifest = load_manifest(pafs.LocalFileSystem(), root, missing_ok=True)
    except CorpusError as e:
        raise DataError(f"data.path: {e}") from None
    return manifest is not None and manifest.origin == "jobs.prepare"


def _prepared_units(prepared: PreparedData, split: str) -> list[Unit]:
    """The split's units: each row group of each shard (one unit per shard for shards of an older
    preparation, which the manifest lists without row groups)."""
    units = []
    for entry in prepared.manifest.splits[split].shards:
        path = prepared.path_of(entry)
        if entry.row_groups is None:
            units.append(Unit(path, None, entry.tokens, entry.sha256, entry.bytes))
        else:
            units += [Unit(path, i, g.tokens, g.sha256, g.stored_bytes) for i, g in enumerate(entry.row_groups)]
    return units


def _open(path: str, on_corrupt: Literal["fail", "skip"], allowed: tuple[str, ...] = (), checksums: bool = False) -> TrainingData:
    """The manifest's data (its tokenizer checked; shards only with ``checksums``). Raises DataError."""
    try:
        with widened_roots(allowed):
            prepared = open_prepared(path, on_corrupt=on_corrupt, verify=checksums)
    except (CorpusError, StorageError, OutsideRoots) as e:
        raise DataError(f"data.path: {e}") from None
    return TrainingData({s: prepared.paths(s) for s in SPLITS}, prepared.filesystem, prepared.tokenizer, path,
                        allowed=allowed, units={s: _prepared_units(prepared, s) for s in SPLITS},
                        manifest=prepared.manifest)


def build_shards(cfg: DataConfig, log: Callable[[str], None] = print) -> TrainingData:
    """Shards prepared from ``data.source`` (workers/data/cache.py), reused while up to date."""
    return _open(str(build_from_source(cfg, log)), cfg.on_corrupt, service_roots(cfg))


def shard_paths(data: TrainingData, split: str) -> list[str]:
    return data.shards[split]


def verify_shards(data: TrainingData) -> None:
    """Check every shard's size, SHA-256 and footer at once (tools and tests; training verifies as
    it reads); raise DataError naming a bad file."""
    _open(data.location, "fail", data.allowed, checksums=True)


def open_training_data(cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print) -> TrainingData:
    """The data of a run: a prepared dataset when ``data.path`` holds one (its manifest and
    tokenizer checked; shards are verified as they are read), else shards prepared from
    ``data.source``. ``vocab_size`` (the model's) must cover the tokenizer's ids. Raises DataError."""
    if cfg.path and _is_prepared(cfg.path):
        data = _open(cfg.path, cfg.on_corrupt)
    else:
        data = build_shards(cfg, log)
    tokens = sum(u.tokens for u in data.units["train"])
    log(f"data: {tokens / 1e6:.1f}M train tokens in {len(data.shards['train'])} shards "
        f"({len(data.units['train'])} row groups) of {data.location} ({data.tokenizer.kind} tokenizer, "
        f"vocab {data.tokenizer.vocab_size})")
    if vocab_size < data.tokenizer.vocab_size:
        raise DataError(f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of {data.location}'s "
                        f"{data.tokenizer.kind} tokenizer ({data.tokenizer.vocab_size}): set model.vocab_size "
                        f">= {data.tokenizer.vocab_size}")
    return data
