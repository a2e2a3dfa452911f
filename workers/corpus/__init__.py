"""Corpus preparation (corpus -> tokens -> packed parquet shards + manifest, local or s3://) and the
one reader of its output, ``open_prepared``. See workers/corpus/prepare.py and manifest.py."""

from workers.corpus.config import PrepareConfig
from workers.corpus.manifest import (
    CorpusError,
    CorruptShardError,
    Manifest,
    PreparedData,
    ShardEntry,
    open_prepared,
)
from workers.corpus.prepare import prepare, ray_runner, run_in_process

__all__ = ["CorpusError", "CorruptShardError", "Manifest", "PrepareConfig", "PreparedData", "ShardEntry",
           "open_prepared", "prepare", "ray_runner", "run_in_process"]
