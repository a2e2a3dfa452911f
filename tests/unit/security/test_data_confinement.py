"""Issue 20, point 2 (data side) and point 7's manifest entries: what a job's data pipeline opens lies
under the team's data roots (ORCH_DATA_ROOTS) when it is opened. A corpus file linked out of them
is skipped and counted, never tokenized; a shard, manifest or tokenizer linked out is refused naming
it; a manifest entry that climbs out of its folder is refused naming it, local or on S3. Unset roots
(an admin's job, a job run by hand) read as before. Real files, real parquet, a real S3 server."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workers.confine import ROOTS_ENV, OutsideRoots
from workers.data import (
    DataConfig,
    DataError,
    PrepareConfig,
    TrainingData,
    build_shards,
    open_prepared,
    open_training_data,
    prepare,
    verify_shards,
)
from workers.data.order import Unit
from workers.data.reader import UnitSource
from workers.data.storage import open_fs, write_bytes_atomic

QUIET = {"log": lambda _: None}


@pytest.fixture
def team(tmp_path, monkeypatch):
    """A team root holding a corpus whose x.py links to another team's secret file (outside the root),
    and whose pkg2 folder links to another team's folder; ORCH_DATA_ROOTS names the root."""
    root, other = tmp_path / "team", tmp_path / "other"
    corpus = root / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (other / "dir").mkdir(parents=True)
    for i in range(6):
        (corpus / "pkg" / f"m{i}.py").write_text(f"def legit_{i}(x):\n    return x + {i}\n" * 40)
    secret = f"SECRET-{uuid.uuid4().hex}"
    (other / "secret.py").write_text(f"token = '{secret}'\n")
    (other / "dir" / "s.py").write_text(f"more = '{secret}'\n")
    (corpus / "x.py").symlink_to(other / "secret.py")
    (corpus / "pkg2").symlink_to(other / "dir")
    monkeypatch.setenv(ROOTS_ENV, json.dumps([str(root)]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root, corpus, other, secret


def _shard_bytes(paths) -> bytes:
    table = pq.read_table(paths)
    return b"".join(bytes(np.asarray(t, dtype=np.uint16).astype(np.uint8)) for t in table.column("tokens").to_pylist())


def test_a_corpus_link_out_of_the_roots_is_skipped_counted_and_never_tokenized(team):
    root, corpus, _, secret = team
    logs = []
    data = open_training_data(DataConfig(source=str(corpus), path=str(root / "shards"), shard_tokens=1024),
                              vocab_size=256, log=logs.append)
    shards = data.shards["train"] + data.shards["val"]
    text = _shard_bytes(shards)
    assert b"legit_5" in text and secret.encode() not in text  # the check looks at real shard contents
    assert any("skipped 2 files linked outside the data roots" in line for line in logs), logs
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["skipped_links"] == 2  # x.py and pkg2/s.py (pyarrow walks a linked folder)
    assert "x.py" not in pq.read_table(shards).column("path").to_pylist()


def test_without_roots_the_same_link_is_read_as_before(team, monkeypatch):
    root, corpus, _, secret = team
    monkeypatch.delenv(ROOTS_ENV)
    m = build_shards(DataConfig(source=str(corpus), path=str(root / "shards"), shard_tokens=1024), **QUIET)
    assert secret.encode() in _shard_bytes(m.shards["train"] + m.shards["val"])
    assert m.manifest.skipped_links == 0


def test_the_service_defaults_stay_readable_when_confined(team, tmp_path):
    """No data.source (the stdlib) and no data.path (the shard cache): both outside the team's root,
    both chosen by the service, so both are read and written."""
    logs = []
    data = open_training_data(DataConfig(max_bytes=20_000, shard_tokens=1024), vocab_size=256, log=logs.append)
    assert data.shards["train"] and all(p.startswith(str(tmp_path / "cache")) for p in data.shards["train"])
    assert data.confinement() is not None and data.confinement().allows(data.shards["train"][0])
    assert not any("linked outside" in line for line in logs)


def test_prepare_skips_and_counts_links_out_and_its_shards_hold_none_of_them(team, tmp_path):
    root, corpus, _, secret = team
    logs = []
    m = prepare(PrepareConfig(source=str(corpus), path=str(root / "prep"), shard_bytes=2048), log=logs.append)
    data = open_prepared(str(root / "prep"))
    text = _shard_bytes(data.shards["train"] + data.shards["val"])
    assert b"legit_0" in text and secret.encode() not in text
    assert m.skipped_links == 2  # x.py and pkg2/s.py (pyarrow walks a linked folder)
    assert any("skipped 2 files linked outside the data roots" in line for line in logs), logs


def test_a_shard_linked_out_of_the_roots_is_refused_naming_it(team, tmp_path):
    root, corpus, other, _ = team
    cfg = DataConfig(source=str(corpus), path=str(root / "shards"), shard_tokens=1024)
    m = build_shards(cfg, **QUIET)
    victim = root / "shards" / m.manifest.splits["train"].shards[0].file
    elsewhere = other / "stolen.parquet"
    victim.rename(elsewhere)  # the same bytes, so only the link gives it away
    victim.symlink_to(elsewhere)
    with pytest.raises(DataError, match=f"file {victim} resolves to .*outside the team's data roots"):
        verify_shards(m)
    # prepared datasets: the tokenizer (the job's own input) the same way
    prepare(PrepareConfig(source=str(corpus), path=str(root / "prep"), shard_bytes=2048), **QUIET)
    tok = next((root / "prep").glob("shards-*/tokenizer.json"))
    tok.rename(other / "tokenizer.json")
    tok.symlink_to(other / "tokenizer.json")
    with pytest.raises(DataError, match=f"data.path: file {tok} resolves to .*outside the team's data roots"):
        open_training_data(DataConfig(path=str(root / "prep")), vocab_size=256)


def test_a_manifest_linked_out_of_the_roots_is_refused_naming_it(team, monkeypatch):
    root, corpus, other, _ = team
    with monkeypatch.context() as m:  # the other team's own preparation
        m.delenv(ROOTS_ENV)
        prepare(PrepareConfig(source=str(corpus), path=str(other / "prep"), shard_bytes=2048), **QUIET)
    (root / "prep").mkdir()
    (root / "prep" / "manifest.json").symlink_to(other / "prep" / "manifest.json")
    with pytest.raises(DataError, match=f"file {root / 'prep' / 'manifest.json'} resolves to .*outside"):
        open_training_data(DataConfig(path=str(root / "prep")), vocab_size=256)


def test_a_read_task_refuses_a_shard_swapped_for_a_link_after_the_check(team, tmp_path):
    root, _, other, _ = team
    table = pa.table({"tokens": pa.array([[1, 2, 3, 4, 5, 6, 7, 8, 9] * 4], pa.list_(pa.uint16()))})
    pq.write_table(table, other / "theirs.parquet")
    (root / "s0.parquet").symlink_to(other / "theirs.parquet")
    data = TrainingData({"train": [str(root / "s0.parquet")]}, pafs.LocalFileSystem(), None, str(root))
    unit = Unit(str(root / "s0.parquet"), None, 36, "0" * 64, 0)
    (task,) = UnitSource([unit], data.filesystem, 7, data.confinement()).get_read_tasks(1)
    with pytest.raises(OutsideRoots, match=f"{root / 's0.parquet'}.*outside the team's data roots"):
        list(task())


def test_a_write_through_a_folder_linked_out_is_refused_before_anything_is_created(team):
    root, _, other, _ = team
    (root / "out").symlink_to(other)
    fs, path = open_fs(str(root))
    with pytest.raises(OutsideRoots, match="outside the team's data roots"):
        write_bytes_atomic(fs, f"{path}/out/shards-x/tokenizer.json", b"{}")
    assert not (other / "shards-x").exists()


def _manifest_with(root, entry: str) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["file"] = entry
    (root / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("entry", ["../other/stolen.parquet", "shards-x/../../stolen.parquet", "/etc/passwd"])
def test_a_prepared_manifest_entry_outside_its_folder_is_refused_naming_it(team, entry, monkeypatch):
    root, corpus, _, _ = team
    monkeypatch.delenv(ROOTS_ENV)  # refused for every job, confined or not
    prepare(PrepareConfig(source=str(corpus), path=str(root / "prep"), shard_bytes=2048), **QUIET)
    _manifest_with(root / "prep", entry)
    with pytest.raises(DataError, match=rf"splits.train.shards.0.file: .*entry '{entry}' lies outside"):
        open_training_data(DataConfig(path=str(root / "prep")), vocab_size=256)


def test_a_prepared_s3_manifest_entry_outside_its_prefix_is_refused_naming_it(team, s3_bucket, tmp_path):
    _, corpus, _, _ = team
    prefix = f"s3://{s3_bucket}/team-a/prep"
    prepare(PrepareConfig(source=str(corpus), path=prefix, shard_bytes=2048), **QUIET)
    fs, path = open_fs(prefix)
    with fs.open_input_stream(f"{path}/manifest.json") as f:
        raw = json.loads(f.read())
    raw["splits"]["train"]["shards"][0]["file"] = "../../team-b/prep/shards-x/train-00000.parquet"
    with fs.open_output_stream(f"{path}/manifest.json") as f:
        f.write(json.dumps(raw).encode())
    with pytest.raises(DataError, match="entry '../../team-b/prep/shards-x/train-00000.parquet' lies outside"):
        open_training_data(DataConfig(path=prefix), vocab_size=256)


def test_a_built_manifest_entry_outside_its_folder_is_refused_naming_it(team):
    root, corpus, _, _ = team
    cfg = DataConfig(source=str(corpus), path=str(root / "shards"), shard_tokens=1024)
    build_shards(cfg, **QUIET)
    raw = json.loads((root / "shards" / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["file"] = "../corpus/pkg/m0.py"
    (root / "shards" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"splits.train.shards.0.file: .*entry '../corpus/pkg/m0.py' lies outside"):
        open_training_data(cfg, vocab_size=256)
