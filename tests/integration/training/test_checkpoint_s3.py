"""Checkpoints on S3 (the session's S3-protocol server on loopback): a run whose checkpoint_storage is
an s3:// prefix keeps Ray Train's run there, and a second run with the same storage resumes from
its latest checkpoint. The shared cluster starts before the test's AWS_* settings are set, so only
what the filesystem carries reaches Ray Train's controller (workers/data/storage.py). About 40 s."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from ray.util.queue import Queue

from jobs.runtime.trainer import RUN_NAME, build_trainer, checkpoint_uri, sample_checkpoint
from jobs.specs.train import load_spec
from tests.conftest import DEMO, TINY
from workers.data.storage import open_fs
from workers.progress import NOTE


def _prepared(tmp_path: Path) -> Path:
    from workers.data import PrepareConfig, prepare

    src = tmp_path / "corpus"
    src.mkdir()
    for f in range(8):
        (src / f"mod{f}.py").write_text("".join(f"v_{f}_{i} = {f * 31 + i}\n" for i in range(150)))
    prepare(PrepareConfig(source=str(src), path=str(tmp_path / "prepared"), shard_bytes=8192, val_fraction=0.1),
            log=lambda _: None)
    return tmp_path / "prepared"


def _steps(fs, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(prefix)) if i.base_name.startswith("step-"))


def test_the_filesystem_carries_endpoint_and_keys_where_ray_unpickles_it(s3_bucket, monkeypatch):
    """What Ray Train's controller gets: the pickled filesystem, in a process whose environment
    holds no AWS_* settings (its node's, not the driver's)."""
    fs, root = open_fs(f"s3://{s3_bucket}/runs")
    fs.create_dir(f"{root}/x")
    shipped = pickle.dumps(fs)
    keys = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    restored = pickle.loads(shipped)
    options = restored.__reduce__()[1][0]  # what pyarrow pickles: the client's options
    assert options["access_key"] == keys["AWS_ACCESS_KEY_ID"] and options["endpoint_override"].startswith("http://127.")
    assert restored.get_file_info(f"{root}/x").type.name == "Directory"


@pytest.mark.ray
def test_checkpoints_go_to_s3_and_a_rerun_resumes_from_them(train_ray, s3_bucket, tmp_path):
    from workers.data import open_training_data

    storage = f"s3://{s3_bucket}/runs/tiny"
    sets = [*TINY, f"data.path={_prepared(tmp_path)}", "data.seq_len=32", "train.checkpoint_every=2",
            "train.log_every=2", "resources.num_workers=1", f"checkpoint_storage={storage}"]
    spec = load_spec(DEMO, [*sets, "train.steps=4"])
    data = open_training_data(spec.data, spec.model.vocab_size, log=lambda _: None)
    out = tmp_path / "out"
    first = build_trainer(spec, data, out, storage=spec.checkpoint_storage).fit()
    fs, root = open_fs(storage)
    assert _steps(fs, f"{root}/{RUN_NAME}") == ["step-00000002", "step-00000004"]
    assert checkpoint_uri(first.checkpoint) == f"{storage}/{RUN_NAME}/step-00000004"
    assert not (out / RUN_NAME).exists()  # nothing of the run in the local output folder

    again = load_spec(DEMO, [*sets, "train.steps=6"])
    progress = Queue(actor_options={"num_cpus": 0})
    second = build_trainer(again, data, out, progress=progress, storage=again.checkpoint_storage).fit()
    notes = [text for kind, text in progress.get_nowait_batch(progress.qsize()) if kind == NOTE]
    assert any(n.startswith("resuming from step 4 ") for n in notes), notes
    assert second.metrics["steps"] == 6
    assert _steps(fs, f"{root}/{RUN_NAME}") == ["step-00000004", "step-00000006"]  # keep_checkpoints: 2
    samples = sample_checkpoint(second.checkpoint, again)  # copied from S3, decoded with its tokenizer
    assert len(samples) == 3 and all(isinstance(s, str) and s for s in samples)


def test_checkpoint_storage_is_a_checked_path_field():
    from jobs.specs.base import SpecError
    from jobs.specs.train import validate_spec
    from orchestrator.auth import check_data_roots

    roots = ["s3://corp/nlp", "/data/nlp"]
    assert check_data_roots("train", {"checkpoint_storage": "s3://corp/nlp/runs/a"}, roots) == []
    assert check_data_roots("train", {"checkpoint_storage": "s3://corp/other"}, roots) == [
        "checkpoint_storage: 's3://corp/other' is outside your team's data roots (s3://corp/nlp, /data/nlp)"]
    with pytest.raises(SpecError, match="checkpoint_storage: .*'gs://b/x': a local folder or s3://bucket/prefix"):
        validate_spec({"checkpoint_storage": "gs://b/x"})
