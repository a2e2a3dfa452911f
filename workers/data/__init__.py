"""The data plane, one package: prepare a corpus, describe it, read it exactly once.

- ``prepare_config``, ``sources``, ``shards``, ``prepare``: corpus -> tokenizer -> parquet shards in
  row groups of bounded size -> ``manifest`` (``python -m jobs.prepare``; version 2, the one format).
- ``cache``: ``data.source`` prepared the same way for a run that names no prepared ``data.path``.
- ``tokenizer``, ``storage``: byte / BPE tokenizers; local folders and ``s3://`` prefixes.
- ``training``: what a run trains on (``open_training_data``, ``TrainingData``).
- ``order``, ``stream``, ``reader``: the epoch's order over canonical units (row groups), the global
  position in a checkpoint, each rank's reads through Ray Data, verified by the task that reads.

The names below are the package's API; modules inside import each other directly, never this file.
"""

from workers.config import DataConfig
from workers.data.cache import DataError
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
from workers.data.tokenizer import EOS_ID as EOS_TOKEN
from workers.data.training import (
           TrainingData,
           build_shards,
           open_training_data,
           shard_paths,
           verify_shards,
)

__all__ = ["EOS_TOKEN", "CorpusError", "CorruptShardError", "DataConfig", "DataError", "Manifest", "PrepareConfig",
           "PreparedData", "ShardEntry", "TrainingData", "build_shards", "open_prepared",
           "open_training_data", "prepare", "ray_runner", "run_in_process", "s3_env", "shard_paths",
           "verify_shards"]
