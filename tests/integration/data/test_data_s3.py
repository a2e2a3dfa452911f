"""Training from a dataset prepared on S3 (the session's S3-protocol server on loopback): the
manifest's shards only, a corrupt row group named by the read task that reads it, and the AWS_* settings set on
the driver reaching Ray Data's read tasks and the Train workers (the cluster starts before they
are set, so the workers do not inherit them)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.runtime.trainer import build_trainer
from jobs.specs.train import load_spec
from tests.conftest import DEMO, TINY
from workers.config import DataConfig
from workers.data import open_training_data


def _prepare(tmp_path: Path, uri: str, **kw) -> None:
    from workers.data import PrepareConfig, prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"m{i:02d}.py").write_text(f"def g{i}(x):\n    return x + {i}\n" * 60)
    prepare(PrepareConfig(source=str(src), path=uri, shard_bytes=4096, val_fraction=0.1, **kw), log=lambda _: None)


def test_a_corrupt_s3_row_group_is_named_by_its_read_task_or_marked_for_skipping(s3_bucket, tmp_path):
    from ray.data.block import BlockAccessor

    from workers.data.reader import CorruptUnit, _read_unit_task, read_unit

    uri = f"s3://{s3_bucket}/prepared"
    _prepare(tmp_path, uri, row_group_bytes=1024)
    data = open_training_data(DataConfig(path=uri), vocab_size=256, log=lambda _: None)
    assert all(p.startswith(f"{s3_bucket}/prepared/shards-") for p in data.shards["train"])
    fs = data.filesystem
    assert isinstance(fs, pafs.S3FileSystem)
    unit = data.units["train"][1]
    assert unit.row_group == 1 and len(read_unit(fs, unit, 32, None)) > 0  # a row group read alone, verified
    col = pq.ParquetFile(fs.open_input_file(unit.path)).metadata.row_group(1).column(1)
    with fs.open_input_stream(unit.path) as f:
        raw = bytearray(f.read())
    raw[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF  # same size: only the check tells
    with fs.open_output_stream(unit.path) as f:
        f.write(bytes(raw))
    # Opening scans nothing; the task reading the row group names it.
    open_training_data(DataConfig(path=uri), vocab_size=256, log=lambda _: None)
    with pytest.raises(CorruptUnit, match=f"shard s3://{unit.path} is corrupt \\(row group 1\\)"):
        read_unit(fs, unit, 32, None)
    (block,) = _read_unit_task(fs, unit, 32, None, "mark")
    assert f"s3://{unit.path} is corrupt (row group 1)" in str(BlockAccessor.for_block(block).to_batch_format("numpy")["corrupt"][0])
    assert len(read_unit(fs, data.units["train"][0], 32, None)) > 0  # the shard's other row groups still read


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
