"""Training from a dataset prepared on S3 (the session's S3-protocol server on loopback): the
manifest's shards only, a corrupt object named before any Ray work, and the AWS_* settings set on
the driver reaching Ray Data's read tasks and the Train workers (the cluster starts before they
are set, so the workers do not inherit them)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.specs import load_spec
from jobs.trainer import build_trainer
from tests.conftest import DEMO, TINY
from workers.config import DataConfig
from workers.data import DataError, open_training_data


def _prepare(tmp_path: Path, uri: str, **kw) -> None:
    from workers.corpus import PrepareConfig, prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"m{i:02d}.py").write_text(f"def g{i}(x):\n    return x + {i}\n" * 60)
    prepare(PrepareConfig(source=str(src), path=uri, shard_bytes=4096, val_fraction=0.1, **kw), log=lambda _: None)


def test_corrupt_s3_shard_is_named_or_skipped(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/prepared"
    _prepare(tmp_path, uri)
    data = open_training_data(DataConfig(path=uri), vocab_size=256, log=lambda _: None)
    assert all(p.startswith(f"{s3_bucket}/prepared/shards-") for p in data.shards["train"])
    victim = data.shards["train"][0]
    fs = data.filesystem
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(victim) as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the SHA-256 tells
    with fs.open_output_stream(victim) as f:
        f.write(bytes(raw))
    with pytest.raises(DataError, match=f"shard s3://{victim} is corrupt: SHA-256"):
        open_training_data(DataConfig(path=uri), vocab_size=256)
    kept = open_training_data(DataConfig(path=uri, on_corrupt="skip"), vocab_size=256, log=lambda _: None)
    assert victim not in kept.shards["train"] and len(kept.shards["train"]) == len(data.shards["train"]) - 1


@pytest.mark.ray
def test_trains_on_a_prepared_s3_dataset(train_ray, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/prepared"
    _prepare(tmp_path, uri)
    spec = load_spec(DEMO, [*TINY, f"data.path={uri}", "data.seq_len=32", "train.steps=4", "train.log_every=2",
                            "resources.num_workers=1"])
    data = open_training_data(spec.data, spec.model.vocab_size, log=lambda _: None)
    result = build_trainer(spec, data, tmp_path / "out").fit()
    assert result.metrics["steps"] == 4 and result.metrics["eval_loss"] is not None
    assert (Path(result.checkpoint.path) / "tokenizer.json").is_file()
