"""The data plane, one package: prepare a corpus, describe it, read it exactly once.

- ``prepare_config``, ``sources``, ``shards``, ``prepare``: corpus -> tokenizer -> parquet shards in
  row groups of bounded size -> ``manifest`` (``python -m jobs.prepare``; version 2, the one format).
- ``cache``: shards built from ``data.source`` for a run that names no prepared ``data.path``.
- ``tokenizer``, ``storage``: byte / BPE tokenizers; local folders and ``s3://`` prefixes.
- ``training``: what a run trains on (``open_training_data``, ``TrainingData``).
- ``order``, ``stream``, ``reader``: the epoch's order over canonical units (row groups), the global
  position in a checkpoint, each rank's reads through Ray Data, verified by the task that reads.

The names below are the package's API; modules inside import each other directly, never this file.
"""

from workers.config import DataConfig
from workers.data.cache import EOS_TOKEN, DataError, build_shards, shard_paths, verify_shards
from workers.data.manifest import (
           CorpusError,
           CorruptShardError,
           Manifest,
           PreparedData,
           ShardEntry,
           open_prepared,
)
from workers.data.prepare import prepare, ray_runner, run_in_process
from workers.data.prepare_config import PrepareConfig
from workers.data.storage import s3_env
from workers.data.training import TrainingData, make_datasets, open_training_data

__all__ = ["EOS_TOKEN", "CorpusError", "CorruptShardError", "DataConfig", "DataError", "Manifest", "PrepareConfig",
           "PreparedData", "ShardEntry", "TrainingData", "build_shards", "make_datasets", "open_prepared",
           "open_training_data", "prepare", "ray_runner", "run_in_process", "s3_env", "shard_paths",
           "verify_shards"]
