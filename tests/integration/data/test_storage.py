"""workers/data/storage.py: one way to reach a folder or an s3:// prefix, with errors that name the place
and never hang (against the session's real S3-protocol server on loopback)."""

import pyarrow.fs as pafs
import pytest

from orchestrator.local.head import free_port
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


def test_s3fs_lists_and_reads_small_objects_of_the_same_bucket(s3_bucket):
    """s3fs (behind pyarrow's fsspec handler) for listings and manifests, pyarrow's client for shards:
    both see the same objects of the real server."""
    from workers.data.storage import is_s3_fs, open_small_fs

    fs, root = open_fs(f"s3://{s3_bucket}/ds")
    for name in ("manifest.json", "shards-x/train-00000.parquet", "shards-x/val-00000.parquet"):
        write_bytes_atomic(fs, f"{root}/{name}", name.encode())
    small, small_root = open_small_fs(f"s3://{s3_bucket}/ds", must_exist=True)
    assert "fsspec" in small.type_name and is_s3_fs(small) and small_root == root
    listed = small.get_file_info(pafs.FileSelector(root, recursive=True))
    assert sorted(i.path for i in listed if i.type == pafs.FileType.File) == [
        f"{root}/manifest.json", f"{root}/shards-x/train-00000.parquet", f"{root}/shards-x/val-00000.parquet"]
    assert read_bytes(small, f"{root}/manifest.json") == b"manifest.json"
    assert uri_of(small, f"{root}/manifest.json") == f"s3://{s3_bucket}/ds/manifest.json"


@pytest.fixture
def profile_only(s3_bucket, tmp_path, monkeypatch):
    """The user's named profile in their AWS config files, and no keys in the environment."""
    (tmp_path / "credentials").write_text("[team]\naws_access_key_id = TEAMKEY\naws_secret_access_key = teamsecret\n")
    (tmp_path / "config").write_text("[profile team]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "team")
    return s3_bucket


def test_a_named_profile_reaches_both_clients_and_the_remote_tasks(profile_only):
    from workers.data.storage import open_small_fs, s3_env

    fs, root = open_fs(f"s3://{profile_only}/p")
    write_bytes_atomic(fs, f"{root}/x.json", b"{}")
    assert fs.__reduce__()[1][0]["access_key"] == "TEAMKEY"  # travels with the pickled filesystem
    small, _ = open_small_fs(f"s3://{profile_only}/p")
    assert read_bytes(small, f"{root}/x.json") == b"{}"
    env = s3_env()
    assert env["AWS_ACCESS_KEY_ID"] == "TEAMKEY" and env["AWS_SECRET_ACCESS_KEY"] == "teamsecret"


def test_a_profile_that_does_not_exist_is_named(profile_only, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(StorageError, match="S3 credentials: .*nope"):
        open_fs(f"s3://{profile_only}/p")
