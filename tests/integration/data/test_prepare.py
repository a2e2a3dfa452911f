"""`python -m jobs.prepare` end to end on a real embedded Ray cluster: local folders, and S3 to S3
through the session's S3-protocol server on loopback (the AWS_* environment reaches the tasks)."""

import os
import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from workers.data import open_prepared

pytestmark = pytest.mark.ray


def _corpus(fs: pafs.FileSystem, root: str) -> int:
    """Write a small corpus under ``root``; returns the number of text files."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(f"{root}/src")
    for i in range(12):
        with fs.open_output_stream(f"{root}/src/m{i:02d}.py") as f:
            f.write((f"def g{i}(a, b):\n    return a + b * {i}\n" * 60).encode())
    with fs.open_output_stream(f"{root}/src/data.txt") as f:
        f.write(b"\x00binary")
    return 12


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.prepare", "--spec", str(ROOT / "jobs/examples/prepare.yaml"),
                           "--set", "shard_bytes=4096", "--set", "vocab_size=300", "--set", "val_fraction=0.1",
                           *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)


def test_prepare_job_local_then_up_to_date(tmp_path):
    n = _corpus(pafs.LocalFileSystem(), str(tmp_path))
    out = tmp_path / "shards"
    r = _run("--set", f"source={tmp_path / 'src'}", "--set", f"path={out}", "--out", str(tmp_path / "job"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepare: trained a" in r.stdout and "(0 already done" in r.stdout
    assert "prepare: committed" in r.stdout and (tmp_path / "job" / "summary.json").exists()
    data = open_prepared(str(out))
    assert data.tokenizer.kind == "bpe" and data.manifest.skipped_binary == 1
    assert data.rows["train"] + data.rows["val"] == n
    assert pq.read_table(data.shards["train"]).column_names == ["path", "tokens"]
    again = _run("--set", f"source={tmp_path / 'src'}", "--set", f"path={out}")
    assert again.returncode == 0 and "is up to date" in again.stdout


def test_prepare_job_s3_to_s3(s3_bucket, tmp_path):
    fs, _ = pafs.FileSystem.from_uri(f"s3://{s3_bucket}")  # honours AWS_ENDPOINT_URL, as the job does
    n = _corpus(fs, s3_bucket)
    r = _run("--set", f"source=s3://{s3_bucket}/src", "--set", f"path=s3://{s3_bucket}/shards", "--set", "tokenizer=bytes")
    assert r.returncode == 0, r.stdout + r.stderr
    data = open_prepared(f"s3://{s3_bucket}/shards")
    assert all(u.startswith(f"s3://{s3_bucket}/shards/shards-") for u in data.shards["train"])
    assert data.rows["train"] + data.rows["val"] == n and data.tokenizer.kind == "bytes"
    table = pq.read_table(data.paths("train"), filesystem=data.filesystem)
    assert data.tokenizer.decode(table.column("tokens")[0].as_py()).startswith("def g")
    missing = _run("--set", f"source=s3://{s3_bucket}/nothing-here", "--set", f"path=s3://{s3_bucket}/x")
    assert missing.returncode == 1 and f"bucket '{s3_bucket}'" in missing.stderr and "does not exist" in missing.stderr


def test_a_large_data_source_is_prepared_by_ray_data_tasks(train_ray, tmp_path, monkeypatch):
    """Issue 24: data.source goes through jobs.prepare's code; past IN_PROCESS_MAX_BYTES, with Ray up,
    its shards are Ray Data tasks (the in-process runner is made to fail, so only they can build)."""
    import workers.data.cache as cache
    from workers.config import DataConfig
    from workers.data import build_shards

    def refuse(*args, **kw):
        raise AssertionError("built in process")

    _corpus(pafs.LocalFileSystem(), str(tmp_path))
    monkeypatch.setattr(cache, "IN_PROCESS_MAX_BYTES", 1024)
    monkeypatch.setattr(cache, "run_in_process", refuse)
    data = build_shards(DataConfig(source=str(tmp_path / "src"), path=str(tmp_path / "out"), shard_tokens=4096),
                        log=lambda _: None)
    assert data.manifest.origin == "data.source" and len(data.manifest.splits["train"].shards) > 1
    assert data.manifest.splits["train"].documents + data.manifest.splits["val"].documents == 12
