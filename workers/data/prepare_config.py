"""The preparation's typed config (torch-free, like workers/config.py): what to read, how to
tokenize and pack it, where the shards go. ``jobs/specs/prepare.py`` composes it into a job spec."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.config import DEFAULT_EXTENSIONS, Config
from workers.data.tokenizer import BYTE_VOCAB_SIZE, MAX_VOCAB_SIZE


class PrepareConfig(Config):
    # Folder or s3:// prefix of text/code files; None means the running Python's standard library.
    source: str | None = None
    # Folder or s3:// prefix the shards, tokenizer.json and manifest.json go to (a train spec's data.path).
    path: str = Field(min_length=1, max_length=1024)
    extensions: tuple[str, ...] = Field(DEFAULT_EXTENSIONS, min_length=1, max_length=64)
    # Cap on corpus bytes read (files in listing order); None reads everything.
    max_bytes: int | None = Field(None, ge=1024)
    # Share of files held out for evaluation (chosen by a hash of the relative path, workers/data/sources.py).
    val_fraction: float = Field(0.02, ge=0.0, le=0.5)
    # bytes: UTF-8 bytes (vocab 256); bpe: a byte-level BPE trained on a sample of the corpus.
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    # BPE vocabulary (ids, including the 256 byte symbols and the end-of-document token).
    vocab_size: int = Field(8192, gt=BYTE_VOCAB_SIZE + 1, le=MAX_VOCAB_SIZE)
    # Corpus bytes the BPE trains on: files spread evenly over the listing (~15 s per 50 MB per core).
    bpe_sample_bytes: int = Field(20_000_000, ge=1024, le=2_000_000_000)
    # Input bytes per shard (the unit of parallel work and of resume): whole files are grouped until
    # this is reached, so a shard is ~2x this as bytes tokens in memory while it is built.
    shard_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=2**31 - 1)
    # Bytes of tokens (2 per token) per parquet row group: the unit a training read task reads,
    # verifies (its tokens' SHA-256 is in the manifest) and resumes in, so a task holds about this
    # much decoded. A document longer than this is one row group of its own.
    row_group_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024**3)
    # None: one row per document (path, tokens ending in EOS). N: rows of exactly N tokens, documents
    # concatenated and cut (path = the document the row starts in); each shard's tail (< N) is dropped.
    pack_len: int | None = Field(None, ge=8, le=131072)

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        bad = [e for e in self.extensions if not e.startswith(".")]
        if bad:
            raise ValueError(f"extensions must start with a dot: {bad}")
        return self
