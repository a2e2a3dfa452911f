"""Corpus -> parquet shards: caching, held-out split, packing, corrupt shards named."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.data import (
    EOS_TOKEN,
    DataConfig,
    DataError,
    build_shards,
    pack_sequences,
    shard_paths,
    verify_shards,
)


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "pkg").mkdir(parents=True)
    for i in range(20):
        (src / "pkg" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 50)
    (src / "notes.md").write_text("# notes\n" * 100)
    (src / "blob.py").write_bytes(b"\x00\x01binary")  # skipped: holds NUL
    (src / "site-packages").mkdir()
    (src / "site-packages" / "dep.py").write_text("x = 1\n")  # skipped: installed packages
    return src


def _cfg(corpus, tmp_path, **kw):
    return DataConfig(source=str(corpus), path=str(tmp_path / "shards"), shard_tokens=4096, **kw)


def test_builds_train_and_val_shards_and_reuses_them(corpus, tmp_path):
    logs = []
    m = build_shards(_cfg(corpus, tmp_path, val_fraction=0.1), logs.append)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] + val["documents"] == 21 and val["documents"] >= 1
    assert m["skipped_binary"] == 1
    assert len(train["files"]) > 1  # shard_tokens=4096 splits the corpus
    table = pq.read_table(shard_paths(m, "train"))
    assert "site-packages/dep.py" not in table.column("path").to_pylist()
    assert all(t[-1] == EOS_TOKEN for t in table.column("tokens").to_pylist())
    text = bytes(table.column("tokens")[0].as_py()[:-1]).decode()
    assert text.startswith(("def f", "# notes"))  # the bytes are the file's UTF-8 text
    verify_shards(m)
    logs.clear()
    assert build_shards(_cfg(corpus, tmp_path, val_fraction=0.1), logs.append)["fingerprint"] == m["fingerprint"]
    assert any("reusing" in line for line in logs)


def test_changed_corpus_rebuilds(corpus, tmp_path):
    m1 = build_shards(_cfg(corpus, tmp_path), lambda _: None)
    (corpus / "new.py").write_text("print('new')\n")
    m2 = build_shards(_cfg(corpus, tmp_path), lambda _: None)
    assert m2["fingerprint"] != m1["fingerprint"]
    assert m2["splits"]["train"]["documents"] + m2["splits"]["val"]["documents"] == 22


def test_missing_and_empty_source(tmp_path):
    with pytest.raises(DataError, match="data.source: folder .*nope does not exist"):
        build_shards(DataConfig(source=str(tmp_path / "nope"), path=str(tmp_path / "s")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files ending in"):
        build_shards(DataConfig(source=str(tmp_path / "empty"), path=str(tmp_path / "s")))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named(corpus, tmp_path, damage):
    m = build_shards(_cfg(corpus, tmp_path), lambda _: None)
    victim = shard_paths(m, "train")[1]
    data = bytearray(open(victim, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(DataError, match=f"shard {victim} is corrupt"):
        verify_shards(m)


def test_pack_sequences_concatenates_and_cuts():
    docs = [np.arange(1, 11, dtype=np.uint16), np.arange(20, 27, dtype=np.uint16)]  # 10 + 7 tokens
    table = pa.table({"tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint16()))})
    rows = pack_sequences(table, seq_len=4)["input_ids"]  # 17 tokens -> 3 rows of 5, 2 dropped
    assert rows.shape == (3, 5)
    assert rows.ravel().tolist() == list(range(1, 11)) + [20, 21, 22, 23, 24]
