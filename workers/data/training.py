"""Training data: a prepared dataset or shards built from ``data.source``, as one ``TrainingData``.

Shards built from ``data.source`` (UTF-8 bytes, vocab 256) live in ``data.path`` or the service's
shard cache: workers/data/cache.py (layout, reuse, and what a rebuild may delete).

A prepared dataset (``python -m jobs.prepare``: a local folder or ``s3://`` prefix holding a
version-2 manifest, workers/data/manifest.py) is read instead when ``data.path`` names one:
exactly the shards its manifest lists, with its tokenizer. Nothing is scanned before training: a
shard (or row group) is verified by the read task that reads it (workers/data/reader.py).

The training split is read as canonical units, each by one worker, in an order that is a function
of (seed, epoch) (workers/data/order.py, workers/data/stream.py); ``train_plan`` is what the
workers get. The held-out split streams through Ray Data (``make_datasets``), split across workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from workers import confine
from workers.config import DataConfig
from workers.confine import OutsideRoots
from workers.data.cache import SPLITS, DataError, build_shards, shard_paths
from workers.data.order import Unit
from workers.data.storage import s3_env
from workers.data.stream import TrainPlan
from workers.data.tokenizer import ByteTokenizer, Tokenizer


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

    @classmethod
    def from_built(cls, manifest: dict[str, Any]) -> TrainingData:
        """The shards ``build_shards`` made from ``data.source`` (byte tokens, local; one row group
        each, verified as files)."""
        root = manifest["root"]
        units = {s: [Unit(f"{root}/{f['name']}", None, f["tokens"], f["sha256"], f["bytes"])
                     for f in manifest["splits"][s]["files"]] for s in SPLITS}
        return cls({s: shard_paths(manifest, s) for s in SPLITS}, pafs.LocalFileSystem(), ByteTokenizer(), root,
                   allowed=tuple(manifest.get("allowed", ())), units=units)

    def confinement(self) -> confine.Confinement | None:
        """Where the read tasks may open local shards (the job's roots and ``allowed``); None when
        the job is unconfined or its shards lie on S3 (no links there)."""
        roots = confine.from_env()
        if roots is None or not isinstance(self.filesystem, pafs.LocalFileSystem):
            return None
        return roots.with_roots(*self.allowed)

    def train_plan(self, cfg: DataConfig) -> TrainPlan:
        """The training split as every worker reads it."""
        return TrainPlan(self.units["train"], self.filesystem, cfg.seq_len, self.confinement(), cfg.on_corrupt, s3_env() or None)


def _is_prepared(path: str) -> bool:
    """``path`` holds a jobs.prepare manifest (an s3:// prefix can hold nothing else)."""
    from workers.data.manifest import CorpusError, load_manifest

    if path.startswith("s3://"):
        return True
    if "://" in path and not path.startswith("file://"):
        return False  # shards_dir names the scheme in its error
    try:
        root = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        return load_manifest(pafs.LocalFileSystem(), root, missing_ok=True) is not None
    except CorpusError as e:
        raise DataError(f"data.path: {e}") from None


def _prepared_units(prepared: Any, split: str) -> list[Unit]:
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


def open_training_data(cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print) -> TrainingData:
    """The data of a run: a prepared dataset when ``data.path`` holds one (its manifest and
    tokenizer checked; shards are verified as they are read), else shards built from
    ``data.source``. ``vocab_size`` (the model's) must cover the tokenizer's ids. Raises DataError."""
    from workers.data.manifest import CorpusError, open_prepared
    from workers.data.storage import StorageError

    if cfg.path and _is_prepared(cfg.path):
        try:
            prepared = open_prepared(cfg.path, on_corrupt=cfg.on_corrupt, verify=False)
        except (CorpusError, StorageError, OutsideRoots) as e:
            raise DataError(f"data.path: {e}") from None
        data = TrainingData({s: prepared.paths(s) for s in SPLITS}, prepared.filesystem, prepared.tokenizer, cfg.path,
                            units={s: _prepared_units(prepared, s) for s in SPLITS})
        log(f"data: {prepared.tokens['train'] / 1e6:.1f}M train tokens in {len(data.shards['train'])} shards "
            f"({len(data.units['train'])} row groups) of {cfg.path} ({data.tokenizer.kind} tokenizer, "
            f"vocab {data.tokenizer.vocab_size})")
    else:
        data = TrainingData.from_built(build_shards(cfg, log))
    if vocab_size < data.tokenizer.vocab_size:
        raise DataError(f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of {data.location}'s "
                        f"{data.tokenizer.kind} tokenizer ({data.tokenizer.vocab_size}): set model.vocab_size "
                        f">= {data.tokenizer.vocab_size}")
    return data


def make_datasets(data: TrainingData, cfg: DataConfig) -> dict[str, Any]:
    """The held-out split as a Ray Data stream of packed rows, one verified read task per unit
    (workers/data/reader.py UnitSource; a corrupt one fails naming the file, or with
    ``on_corrupt: skip`` yields nothing), split across the workers by Ray Train. The training split
    is read by the workers themselves (``TrainingData.train_plan``)."""
    import ray.data

    from workers.data.reader import UnitSource

    env = s3_env()
    units = data.units.get("val")
    if not units:
        return {}
    source = UnitSource(units, data.filesystem, cfg.seq_len, data.confinement(),
                        "drop" if cfg.on_corrupt == "skip" else "fail")
    return {"val": ray.data.read_datasource(source, concurrency=cfg.read_tasks, override_num_blocks=len(units),
                                            runtime_env={"env_vars": env} if env else None)}
