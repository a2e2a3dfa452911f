"""workers/data/storage.py: one way to reach a folder or an s3:// prefix, with errors that name the place
and never hang (against the session's real S3-protocol server on loopback)."""

import pyarrow.fs as pafs
import pytest

from orchestrator.local_ray import free_port
from workers.data.storage import StorageError, open_fs, read_bytes, uri_of, write_bytes_atomic


def test_local_write_read_and_missing_folder(tmp_path):
    fs, root = open_fs(str(tmp_path))
    write_bytes_atomic(fs, f"{root}/a/b.bin", b"payload")
    assert read_bytes(fs, f"{root}/a/b.bin") == b"payload"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temporary file left
    with pytest.raises(StorageError, match=f"{tmp_path / 'nope'}: does not exist"):
        open_fs(str(tmp_path / "nope"), must_exist=True)
    with pytest.raises(StorageError, match="only local folders and s3://"):
        open_fs("gs://bucket/x")


def test_s3_roundtrip_through_the_endpoint_from_the_environment(s3_bucket):
    fs, root = open_fs(f"s3://{s3_bucket}/prefix")
    assert isinstance(fs, pafs.S3FileSystem) and root == f"{s3_bucket}/prefix"
    write_bytes_atomic(fs, f"{root}/x.json", b"{}")
    assert read_bytes(fs, f"{root}/x.json") == b"{}"
    assert uri_of(fs, f"{root}/x.json") == f"s3://{s3_bucket}/prefix/x.json"
    open_fs(f"s3://{s3_bucket}/prefix", must_exist=True)
    with pytest.raises(StorageError, match=f"bucket '{s3_bucket}' .*: does not exist"):
        open_fs(f"s3://{s3_bucket}/elsewhere", must_exist=True)


def test_missing_bucket_is_named(s3_bucket):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' .*the bucket does not exist"):
        open_fs("s3://no-such-bucket/out")


def test_unreachable_endpoint_ends_in_one_error_naming_the_bucket(s3_bucket, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match=f"cannot reach bucket '{s3_bucket}' .* at {dead}: .*after 3 attempts"):
        open_fs(f"s3://{s3_bucket}/corpus", must_exist=True)
