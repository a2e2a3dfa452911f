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
    open_training_data,
    shard_paths,
    verify_shards,
)
from workers.data.order import Unit
from workers.data.reader import UnitSource, pack_sequences, packed_blocks


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
    train, val = m.manifest.splits["train"], m.manifest.splits["val"]
    assert train.documents + val.documents == 21 and val.documents >= 1
    assert m.manifest.skipped_binary == 1 and m.manifest.origin == "data.source"
    assert len(train.shards) > 1  # shard_tokens=4096 splits the corpus
    table = pq.read_table(shard_paths(m, "train"))
    assert "site-packages/dep.py" not in table.column("path").to_pylist()
    assert all(t[-1] == EOS_TOKEN for t in table.column("tokens").to_pylist())
    text = bytes(table.column("tokens")[0].as_py()[:-1]).decode()
    assert text.startswith(("def f", "# notes"))  # the bytes are the file's UTF-8 text
    verify_shards(m)
    logs.clear()
    assert build_shards(_cfg(corpus, tmp_path, val_fraction=0.1), logs.append).manifest == m.manifest
    assert any("up to date" in line for line in logs)


def test_changed_corpus_rebuilds(corpus, tmp_path):
    m1 = build_shards(_cfg(corpus, tmp_path), lambda _: None)
    (corpus / "new.py").write_text("print('new')\n")
    m2 = build_shards(_cfg(corpus, tmp_path), lambda _: None)
    assert m2.manifest.fingerprint != m1.manifest.fingerprint
    assert m2.manifest.splits["train"].documents + m2.manifest.splits["val"].documents == 22


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
    rows = pack_sequences(table, seq_len=4)  # 17 tokens -> 3 rows of 5, 2 dropped
    assert rows.shape == (3, 5)
    assert rows.ravel().tolist() == list(range(1, 11)) + [20, 21, 22, 23, 24]


def _docs_table(rng, n_docs):
    docs = [rng.integers(1, 256, rng.integers(1, 40), dtype=np.uint16) for _ in range(n_docs)]
    return pa.table({"tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint16()))})


@pytest.mark.parametrize("batch_docs", [1, 3, 50])
def test_packing_a_shard_in_pieces_gives_the_rows_of_packing_it_whole(batch_docs):
    table = _docs_table(np.random.default_rng(batch_docs), 50)
    whole = pack_sequences(table, seq_len=7)
    blocks = list(packed_blocks(table.to_batches(max_chunksize=batch_docs), seq_len=7, block_rows=4))
    assert all(1 <= len(b) <= 4 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), whole)
    assert len(whole) == sum(len(d) for d in table.column("tokens").to_pylist()) // 8


# ----------------------------------------------------------------------------------------------
# Prepared datasets, the tokenizer in checkpoints (the training order: tests/unit/workers/data/test_data_order.py)


@pytest.fixture
def prepared(corpus, tmp_path):
    from workers.data import PrepareConfig, prepare

    cfg = PrepareConfig(source=str(corpus), path=str(tmp_path / "prepared"), shard_bytes=4096, val_fraction=0.1)
    return prepare(cfg, log=lambda _: None), tmp_path / "prepared"


def test_prepared_path_reads_exactly_the_manifest_shards(prepared):
    manifest, root = prepared
    (root / "stray.parquet").write_bytes(b"not listed")  # never read: not in the manifest
    data = open_training_data(DataConfig(path=str(root)), vocab_size=256, log=lambda _: None)
    listed = {s: [str(root / e.file) for e in manifest.splits[s].shards] for s in ("train", "val")}
    assert data.shards == listed and data.tokenizer.kind == "bytes" and not data.skipped


def test_opening_a_prepared_dataset_scans_no_shard(prepared):
    """Integrity is the read task's (tests/unit/workers/data/test_data_order.py): a damaged shard does not fail the
    open, which reads only the manifest and the tokenizer."""
    manifest, root = prepared
    victim = root / manifest.splits["train"].shards[0].file
    victim.write_bytes(b"garbage")
    data = open_training_data(DataConfig(path=str(root)), vocab_size=256, log=lambda _: None)
    assert str(victim) in data.shards["train"] and not data.skipped


def test_bpe_vocab_must_fit_the_model_and_travels_in_checkpoints(corpus, tmp_path):
    from workers.checkpoint import TOKENIZER_FILE, load_tokenizer_for
    from workers.data import PrepareConfig, prepare

    root = tmp_path / "bpe"
    prepare(PrepareConfig(source=str(corpus), path=str(root), shard_bytes=4096, tokenizer="bpe", vocab_size=300),
            log=lambda _: None)
    with pytest.raises(DataError, match=r"model.vocab_size \(256\) is smaller .* \(300\)"):
        open_training_data(DataConfig(path=str(root)), vocab_size=256)
    data = open_training_data(DataConfig(path=str(root)), vocab_size=300, log=lambda _: None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert load_tokenizer_for(ckpt).kind == "bytes"  # a checkpoint that stores none: byte shards
    (ckpt / TOKENIZER_FILE).write_text(data.tokenizer.to_json())
    tok = load_tokenizer_for(ckpt)
    ids = tok.encode_docs([b"def f(x):\n    return x\n"])[0]
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.decode(ids) == "def f(x):\n    return x\n"


def test_uri_without_a_preparation_is_named(tmp_path):
    with pytest.raises(DataError, match="data.path: .*gs://b/x"):
        open_training_data(DataConfig(path="gs://b/x"), vocab_size=256)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=f"data.path: {tmp_path / 'bad' / 'manifest.json'} is corrupt"):
        open_training_data(DataConfig(path=str(tmp_path / "bad")), vocab_size=256)


def test_a_shard_damaged_after_the_check_fails_its_read_naming_it(tmp_path):
    import pyarrow.fs as pafs

    path = tmp_path / "s0.parquet"
    pq.write_table(_docs_table(np.random.default_rng(0), 40), path)
    path.write_bytes(path.read_bytes()[:-100])  # the footer gone
    unit = Unit(str(path), 0, 10, "0" * 64, path.stat().st_size)
    (task,) = UnitSource([unit], pafs.LocalFileSystem(), seq_len=7).get_read_tasks(parallelism=1)
    with pytest.raises(DataError, match=f"shard {path} is corrupt \\(row group 0\\)"):
        list(task())



def test_the_data_package_has_no_import_cycle_and_no_copied_helper():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[4] / "workers" / "data"
    trees = {p.stem: ast.parse(p.read_text()) for p in root.glob("*.py")}
    imports = {m: {n.module.rsplit(".", 1)[-1] for n in ast.walk(t) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("workers.data.")} for m, t in trees.items() if m != "__init__"}

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in imports.get(start, ()))

    assert not [m for m in imports if reaches(m, m)]
    defined = [n.name for t in trees.values() for n in t.body if isinstance(n, ast.FunctionDef)]
    for helper in ("is_val", "sha256_hex", "sha256_of", "s3_env"):
        assert sum(name.lstrip("_") == helper for name in defined) == 1, helper
