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
from workers.order import global_batches, ordered_rows
from workers.shard_reader import ShardSource, pack_sequences, packed_blocks


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


def test_the_shard_source_plans_one_task_per_listed_shard_and_streams_it(tmp_path, monkeypatch):
    import pyarrow.fs as pafs
    from ray.data.block import BlockAccessor

    import workers.shard_reader as reader

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"s{i}.parquet"
        pq.write_table(_docs_table(rng, 40), path, row_group_size=7)  # several row groups each
        paths.append(str(path))
    order = [paths[2], paths[0]]  # a manifest's list, in the run's order; s1 is not listed
    monkeypatch.setattr(reader, "BLOCK_TOKENS", 5 * 8)  # 5 rows of seq_len 7 per block
    tasks = ShardSource(order, pafs.LocalFileSystem(), seq_len=7).get_read_tasks(parallelism=200)
    assert [t.metadata.input_files for t in tasks] == [(p,) for p in order]
    for task, path in zip(tasks, order, strict=True):
        blocks = [BlockAccessor.for_block(b).to_batch_format("numpy")["input_ids"] for b in task()]
        assert len(blocks) > 1 and all(len(b) <= 5 for b in blocks)
        assert np.array_equal(np.concatenate(blocks), pack_sequences(pq.read_table(path), seq_len=7))


# ----------------------------------------------------------------------------------------------
# The training order, prepared datasets, the tokenizer in checkpoints


def _stream(n_rows, seq=5):
    rows = np.arange(n_rows * seq, dtype=np.uint16).reshape(n_rows, seq)  # row i starts with i * seq
    return rows


def _blocks(rows, sizes):
    out, i = [], 0
    while i < len(rows):
        size = sizes[len(out) % len(sizes)]
        out.append(rows[i:i + size])
        i += size
    return out


def test_training_order_ignores_block_sizes_and_changes_per_epoch():
    rows = _stream(50)
    a = np.concatenate(list(ordered_rows(_blocks(rows, [7]), seed=3, epoch=0, window_rows=16)))
    b = np.concatenate(list(ordered_rows(_blocks(rows, [1, 30, 4]), seed=3, epoch=0, window_rows=16)))
    c = np.concatenate(list(ordered_rows(_blocks(rows, [7]), seed=3, epoch=1, window_rows=16)))
    assert (a == b).all() and not (a == c).all()
    assert sorted(r[0] for r in a.tolist()) == sorted(r[0] for r in rows.tolist())  # a permutation


@pytest.mark.parametrize("stop, new_batch", [(3, 4), (2, 3), (5, 16)])
def test_resume_at_a_sequence_count_trains_each_row_once(stop, new_batch):
    """2 workers x 4 rows for `stop` steps, then any global batch from the saved count: the rows
    applied are the order's first rows, each once (the tail shorter than a batch is dropped)."""
    order = np.concatenate(list(ordered_rows(_blocks(_stream(70), [9]), seed=0, epoch=0, window_rows=32)))
    first = list(global_batches(ordered_rows(_blocks(_stream(70), [9]), 0, 0, 32), batch_rows=8, skip=0))[:stop]
    saved = first[-1][0] + 8
    rest = list(global_batches(ordered_rows(_blocks(_stream(70), [13]), 0, 0, 32), new_batch, skip=saved))
    starts = [s for s, _ in first + rest]
    applied = np.concatenate([r for _, r in first + rest])
    assert starts == [*range(0, saved, 8), *range(saved, saved + new_batch * len(rest), new_batch)]
    assert (applied == order[:len(applied)]).all()
    assert len(order) - len(applied) < new_batch


@pytest.fixture
def prepared(corpus, tmp_path):
    from workers.corpus import PrepareConfig, prepare

    cfg = PrepareConfig(source=str(corpus), path=str(tmp_path / "prepared"), shard_bytes=4096, val_fraction=0.1)
    return prepare(cfg, log=lambda _: None), tmp_path / "prepared"


def test_prepared_path_reads_exactly_the_manifest_shards(prepared):
    manifest, root = prepared
    (root / "stray.parquet").write_bytes(b"not listed")  # never read: not in the manifest
    data = open_training_data(DataConfig(path=str(root)), vocab_size=256, log=lambda _: None)
    listed = {s: [str(root / e.file) for e in manifest.splits[s].shards] for s in ("train", "val")}
    assert data.shards == listed and data.tokenizer.kind == "bytes" and not data.skipped


def test_prepared_corrupt_shard_fails_naming_it_or_is_skipped(prepared):
    manifest, root = prepared
    victim = root / manifest.splits["train"].shards[0].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {victim} is corrupt"):
        open_training_data(DataConfig(path=str(root)), vocab_size=256)
    logs = []
    kept = open_training_data(DataConfig(path=str(root), on_corrupt="skip"), vocab_size=256, log=logs.append)
    assert str(victim) not in kept.shards["train"] and len(kept.shards["train"]) == len(manifest.splits["train"].shards) - 1
    assert any(f"skipping corrupt shard {victim}" in line for line in logs)


def test_bpe_vocab_must_fit_the_model_and_travels_in_checkpoints(corpus, tmp_path):
    from workers.checkpoint import TOKENIZER_FILE, load_tokenizer_for
    from workers.corpus import PrepareConfig, prepare

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


def test_the_training_pipeline_reads_ahead_a_bounded_amount_in_one_order():
    from jobs.trainer import TRAIN_READ_AHEAD_BYTES, data_config

    config = data_config()
    train = config._resolve_execution_options("train")  # what Ray Train hands the training pipeline
    assert train.preserve_order and train.resource_limits.object_store_memory == TRAIN_READ_AHEAD_BYTES
    assert config._datasets_to_split == ["val"]  # every worker streams the whole training split


def test_a_shard_damaged_after_the_check_fails_its_read_naming_it(tmp_path):
    import pyarrow.fs as pafs

    path = tmp_path / "s0.parquet"
    pq.write_table(_docs_table(np.random.default_rng(0), 40), path)
    path.write_bytes(path.read_bytes()[:-100])  # the footer gone
    (task,) = ShardSource([str(path)], pafs.LocalFileSystem(), seq_len=7).get_read_tasks(parallelism=1)
    with pytest.raises(DataError, match=f"shard {path} cannot be read"):
        list(task())

