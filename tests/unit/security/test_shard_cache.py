"""Issue 20, point 6: the shared shard cache never pulls files from under a running job. The cache
folder's key covers every setting that changes the shards; a rebuild writes a new set beside the
one in use, switches by replacing the manifest, and deletes only files a manifest of ours listed
(the set before the previous one); a folder of parquet files it did not write is never touched.
Issue 24: the cache is jobs.prepare's preparation with one manifest format; a version-1 manifest is
read once more, for the migration, and refused with what to run where it cannot be migrated."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.data import DataConfig, DataError, build_shards, open_training_data, shard_paths, verify_shards

QUIET = {"log": lambda _: None}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 60)
    return src


def _files(m):
    return shard_paths(m, "train") + shard_paths(m, "val")


def test_jobs_with_another_shard_tokens_do_not_delete_each_others_cached_shards(corpus):
    a = build_shards(DataConfig(source=str(corpus), shard_tokens=1024), **QUIET)
    b = build_shards(DataConfig(source=str(corpus), shard_tokens=4096), **QUIET)
    assert a.location != b.location  # shard_tokens is part of the cache key
    again = build_shards(DataConfig(source=str(corpus), shard_tokens=1024), **QUIET)
    assert _files(again) == _files(a)  # reused, not rebuilt
    verify_shards(a)  # every file job A reads is still there, whole
    verify_shards(b)


def test_a_rebuild_in_one_folder_writes_beside_and_keeps_the_set_in_use(corpus, tmp_path):
    path = str(tmp_path / "shared")
    a = build_shards(DataConfig(source=str(corpus), path=path, shard_tokens=1024), **QUIET)
    (tmp_path / "shared" / "notes.txt").write_text("the team's own file")
    b = build_shards(DataConfig(source=str(corpus), path=path, shard_tokens=4096), **QUIET)
    assert set(_files(a)).isdisjoint(_files(b))
    verify_shards(a)  # a job still reading the previous set reads it whole
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["origin"] == "data.source"
    assert [str(tmp_path / "shared" / n) for n in manifest["retired"] if n.endswith(".parquet")] == sorted(_files(a))
    c = build_shards(DataConfig(source=str(corpus), path=path, shard_tokens=2048), **QUIET)
    verify_shards(b)
    verify_shards(c)
    assert not any(Path(p).exists() for p in _files(a))  # two sets back: deleted, as listed
    assert not Path(_files(a)[0]).parent.exists()  # and its emptied set folder
    assert (tmp_path / "shared" / "notes.txt").read_text() == "the team's own file"  # never listed, kept
    back = build_shards(DataConfig(source=str(corpus), path=path, shard_tokens=1024), **QUIET)
    verify_shards(back)  # the same set as A again: rewritten whole, and not deleted as retired
    verify_shards(c)


def test_a_folder_of_user_parquet_files_is_left_untouched_with_a_clear_error(corpus, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), theirs / "part-0.parquet")
    before = (theirs / "part-0.parquet").read_bytes()
    with pytest.raises(DataError, match=f"data.path: {theirs} holds parquet files but no manifest.json .*untouched"):
        open_training_data(DataConfig(source=str(corpus), path=str(theirs)), vocab_size=256, **QUIET)
    assert sorted(p.name for p in theirs.iterdir()) == ["part-0.parquet"]
    assert (theirs / "part-0.parquet").read_bytes() == before


def test_a_manifest_not_written_by_the_builder_is_refused_not_overwritten(corpus, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps({"version": 7, "files": ["a.parquet"]}))
    (theirs / "a.parquet").write_bytes(b"theirs")
    with pytest.raises(DataError, match="unknown manifest version; it was not written by this service"):
        build_shards(DataConfig(source=str(corpus), path=str(theirs)), **QUIET)
    assert (theirs / "a.parquet").read_bytes() == b"theirs"


def test_a_set_folder_planted_as_a_link_out_is_refused_and_nothing_is_written_there(corpus, tmp_path, monkeypatch):
    team, other = tmp_path / "team", tmp_path / "other"
    other.mkdir()
    cfg = DataConfig(source=str(corpus), path=str(team / "shards"), shard_tokens=1024)
    set_name = Path(shard_paths(build_shards(cfg, **QUIET), "train")[0]).parent.name  # the folder a build picks
    for p in (team / "shards").rglob("*"):
        if p.is_file():
            p.unlink()
    (team / "shards" / set_name).rmdir()
    (team / "shards" / set_name).symlink_to(other)
    monkeypatch.setenv("ORCH_DATA_ROOTS", json.dumps([str(team), str(corpus)]))
    with pytest.raises(DataError, match=f"data.path: file {team / 'shards' / set_name}/.* resolves to {other}/.*, outside"):
        build_shards(cfg, **QUIET)
    assert list(other.iterdir()) == []


def _version_1_cache(folder: Path) -> list[Path]:
    """A folder as the version-1 builder left it: set-<key>/train-00000.parquet and its manifest."""
    (folder / "set-old").mkdir(parents=True)
    pq.write_table(pa.table({"path": ["m.py"], "tokens": [[100, 101, 0]]}), folder / "set-old" / "train-00000.parquet")
    entry = {"name": "set-old/train-00000.parquet", "bytes": 1, "sha256": "0" * 64, "documents": 1, "tokens": 3}
    (folder / "manifest.json").write_text(json.dumps({
        "version": 1, "source": "/somewhere", "splits": {"train": {"files": [entry], "tokens": 3, "documents": 1},
                                                        "val": {"files": [], "tokens": 0, "documents": 0}}}))
    return [folder / "set-old" / "train-00000.parquet"]


def test_a_version_1_cache_is_read_once_to_migrate_and_its_files_retired_then_deleted(corpus, tmp_path):
    path = tmp_path / "shared"
    old = _version_1_cache(path)
    logs = []
    a = build_shards(DataConfig(source=str(corpus), path=str(path), shard_tokens=1024), logs.append)
    assert any("version-1 manifest" in line for line in logs), logs
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["retired"] == ["set-old/train-00000.parquet"]
    assert all(p.exists() for p in old)  # a job of the previous version may still read them
    verify_shards(a)
    build_shards(DataConfig(source=str(corpus), path=str(path), shard_tokens=4096), **QUIET)
    assert not any(p.exists() for p in old) and not (path / "set-old").exists()  # the rebuild after: deleted
    verify_shards(a)  # the set in use before the rebuild is kept


def test_a_version_1_manifest_named_as_a_prepared_dataset_is_refused_with_what_to_run(tmp_path):
    from workers.data import CorpusError, open_prepared

    path = tmp_path / "old"
    _version_1_cache(path)
    with pytest.raises(CorpusError, match=f"{path / 'manifest.json'} is a version-1 manifest .*python -m jobs.prepare"):
        open_prepared(str(path))


def test_a_dataset_prepared_by_jobs_prepare_is_never_rebuilt_from_data_source(corpus, tmp_path):
    from workers.data import PrepareConfig, prepare

    path = tmp_path / "prepared"
    prepare(PrepareConfig(source=str(corpus), path=str(path), shard_bytes=2048, tokenizer="bpe", vocab_size=300),
            **QUIET)
    before = (path / "manifest.json").read_bytes()
    data = open_training_data(DataConfig(source=str(corpus), path=str(path), shard_tokens=1024), 300, **QUIET)
    assert data.tokenizer.kind == "bpe" and (path / "manifest.json").read_bytes() == before
    with pytest.raises(DataError, match=f"{path / 'manifest.json'} is a dataset prepared by `python -m jobs.prepare`"):
        build_shards(DataConfig(source=str(corpus), path=str(path)), **QUIET)
