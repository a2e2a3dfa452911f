"""Training data: a prepared dataset or shards built from ``data.source``; Ray Data streaming of
packed rows, the same for every worker.

Shards built from ``data.source`` (UTF-8 bytes, vocab 256) live in ``data.path`` or the service's
shard cache: workers/corpus_cache.py (layout, reuse, and what a rebuild may delete).

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

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from workers import confine
from workers.config import DataConfig
from workers.confine import OutsideRoots
from workers.corpus_cache import EOS_TOKEN, SPLITS, DataError, build_shards, shard_paths, verify_shards
from workers.tokenizer import ByteTokenizer, Tokenizer

# The S3 settings Ray Data's read tasks and the Train workers need (workers on other nodes do not
# inherit the driver's environment); only those set on the driver are passed.
S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Re-exported: the names callers know this module by.
__all__ = ["EOS_TOKEN", "DataConfig", "DataError", "TrainingData", "build_shards", "make_datasets",
           "open_training_data", "s3_env", "shard_paths", "verify_shards"]


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: the verified shards of each split (paths inside ``filesystem``), the
    tokenizer that made them (stored in every checkpoint) and the shards left out as corrupt."""

    shards: dict[str, list[str]]
    filesystem: pafs.FileSystem
    tokenizer: Tokenizer
    location: str  # the folder or s3:// prefix, for messages
    skipped: list[str] = field(default_factory=list)  # "URI: reason" (data.on_corrupt: skip)
    # Folders the service chose (the shard cache) that a confined job reads outside its data roots.
    allowed: tuple[str, ...] = ()

    @classmethod
    def from_built(cls, manifest: dict[str, Any]) -> TrainingData:
        """The shards ``build_shards`` made from ``data.source`` (byte tokens, local)."""
        return cls({s: shard_paths(manifest, s) for s in SPLITS}, pafs.LocalFileSystem(), ByteTokenizer(),
                   manifest["root"], allowed=tuple(manifest.get("allowed", ())))

    def confinement(self) -> confine.Confinement | None:
        """Where the read tasks may open local shards (the job's roots and ``allowed``); None when
        the job is unconfined or its shards lie on S3 (no links there)."""
        roots = confine.from_env()
        if roots is None or not isinstance(self.filesystem, pafs.LocalFileSystem):
            return None
        return roots.with_roots(*self.allowed)


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
        except (CorpusError, StorageError, OutsideRoots) as e:
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
    roots = data.confinement()
    runtime_env = {"env_vars": env} if env else None
    datasets = {}
    for split in SPLITS:
        paths = data.shards.get(split)
        if not paths:
            continue
        if split == "train":
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
        # One block stream per shard: override_num_blocks keeps Ray from splitting them further.
        datasets[split] = ray.data.read_datasource(ShardSource(paths, data.filesystem, cfg.seq_len, roots),
                                                   concurrency=cfg.read_tasks, override_num_blocks=len(paths),
                                                   runtime_env=runtime_env)
    return datasets
