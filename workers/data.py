"""Corpus -> byte tokens -> parquet shards; Ray Data streaming, packing and per-worker shards."""

from __future__ import annotations

from pydantic import Field

from workers.config import Config

DEFAULT_EXTENSIONS = (".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".rs", ".go", ".js", ".ts", ".java")


class DataConfig(Config):
    # Folder of text or code files; None means the running Python's standard library source.
    source: str | None = None
    # Where the parquet shards go; None means a cache folder keyed by the source (see README).
    path: str | None = None
    extensions: tuple[str, ...] = Field(DEFAULT_EXTENSIONS, min_length=1, max_length=64)
    # Tokens per training sequence (the model sees seq_len inputs and seq_len targets).
    seq_len: int = Field(128, ge=8, le=131072)
    # Share of files held out for evaluation (chosen by a hash of the relative path).
    val_fraction: float = Field(0.02, ge=0.0, le=0.5)
    # Target size of one parquet shard in tokens (bytes): ~4 MiB shards stream in small blocks.
    shard_tokens: int = Field(4 * 1024 * 1024, ge=1024, le=2**31 - 1)
    # Cap on corpus size read from `source`, in bytes; None reads everything.
    max_bytes: int | None = Field(None, ge=1024)
