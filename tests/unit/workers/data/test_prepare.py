"""Corpus preparation without Ray (shards built in-process): manifest, reader, tokenizers, packing,
resume after an interruption, corrupt shards and bad sources named before any work."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.kinds import job_kind
from jobs.specs.base import SpecError
from jobs.specs.prepare import validate_prepare_spec
from workers.data import (
    CorpusError,
    CorruptShardError,
    PrepareConfig,
    open_prepared,
    prepare,
    run_in_process,
)
from workers.data.storage import StorageError
from workers.data.tokenizer import EOS_ID, load_tokenizer

QUIET = {"log": lambda _: None}


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "pkg").mkdir(parents=True)
    for i in range(24):
        (src / "pkg" / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # héllo\n" * 40)
    (src / "notes.md").write_text("# notes\n<|endoftext|> is text here\n" * 30)
    (src / "blob.py").write_bytes(b"\x00\x01binary")  # skipped: holds NUL
    (src / "site-packages").mkdir()
    (src / "site-packages" / "dep.py").write_text("x = 1\n")  # never read: installed packages
    return src


def _cfg(corpus, tmp_path, **kw):
    return PrepareConfig(source=str(corpus), path=str(tmp_path / "out"), shard_bytes=4096, val_fraction=0.1, **kw)


def _texts(corpus):
    return {p.relative_to(corpus).as_posix(): p.read_text() for p in corpus.rglob("*")
            if p.is_file() and "site-packages" not in p.parts and p.name != "blob.py"}


def test_bytes_shards_hold_every_document_and_read_back(corpus, tmp_path):
    m = prepare(_cfg(corpus, tmp_path), **QUIET)
    data = open_prepared(str(tmp_path / "out"))
    assert data.tokenizer.kind == "bytes" and m.skipped_binary == 1 and m.input_files == 26
    assert len(data.shards["train"]) > 1 and data.shards["val"] and not data.skipped
    table = pq.read_table(data.shards["train"] + data.shards["val"])
    assert table.column_names == ["path", "tokens"] and table.schema.field("tokens").type.value_type == pa.uint16()
    docs = dict(zip(table.column("path").to_pylist(), table.column("tokens").to_pylist(), strict=True))
    texts = _texts(corpus)
    assert set(docs) == set(texts)
    for rel, tokens in docs.items():
        assert tokens[-1] == EOS_ID and data.tokenizer.decode(tokens) == texts[rel]
    assert data.rows["train"] + data.rows["val"] == len(texts) == m.splits["train"].documents + m.splits["val"].documents
    assert data.tokens["train"] + data.tokens["val"] == sum(len(t.encode()) + 1 for t in texts.values())


def test_bpe_is_trained_saved_listed_and_lossless(corpus, tmp_path):
    m = prepare(_cfg(corpus, tmp_path, tokenizer="bpe", vocab_size=400), **QUIET)
    assert m.tokenizer.kind == "bpe" and m.tokenizer.file.endswith("/tokenizer.json")
    assert 257 < m.tokenizer.vocab_size <= 400  # a tiny corpus may run out of merges first
    data = open_prepared(str(tmp_path / "out"))
    again = load_tokenizer(data.tokenizer.to_json())  # what a checkpoint stores and loads
    table = pq.read_table(data.shards["train"])
    texts = _texts(corpus)
    for rel, tokens in zip(table.column("path").to_pylist(), table.column("tokens").to_pylist(), strict=True):
        assert again.decode(tokens) == texts[rel] and tokens[-1] == EOS_ID and max(tokens) < 400
        assert EOS_ID not in tokens[:-1]  # "<|endoftext|>" in a file is text, not a document boundary
        assert again.encode_docs([texts[rel].encode()])[0].tolist() == tokens
    assert data.tokens["train"] < sum(len(texts[r].encode()) for r in table.column("path").to_pylist())


def test_packed_rows_have_exactly_pack_len_tokens(corpus, tmp_path):
    m = prepare(_cfg(corpus, tmp_path, pack_len=64), **QUIET)
    table = pq.read_table(open_prepared(str(tmp_path / "out")).shards["train"])
    lengths = {len(t) for t in table.column("tokens").to_pylist()}
    assert lengths == {64} and table.num_rows == m.splits["train"].rows == m.splits["train"].tokens // 64


def test_interrupted_preparation_resumes_without_redoing_finished_shards(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path)
    built: list[str] = []

    def crashing(shards, **kw):
        for i, entry in enumerate(run_in_process(shards, **kw)):
            if i == 2:
                raise KeyboardInterrupt  # the job is stopped mid-way
            built.append(entry.file)
            yield entry

    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, runner=crashing, **QUIET)
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing committed
    with pytest.raises(CorpusError, match="no manifest.json at"):
        open_prepared(str(tmp_path / "out"))
    first = list(built)

    def counting(shards, **kw):
        for entry in run_in_process(shards, **kw):
            built.append(entry.file)
            yield entry

    m = prepare(cfg, runner=counting, **QUIET)
    total = len(m.splits["train"].shards) + len(m.splits["val"].shards)
    redone = built[len(first):]
    # The third shard's task finished (done-record written) before the driver stopped: not redone either.
    assert len(first) == 2 and len(redone) == total - 3
    assert not set(first) & set(redone) and not any(f.endswith("train-00002.parquet") for f in redone)
    built.clear()
    assert prepare(cfg, runner=counting, **QUIET).fingerprint == m.fingerprint and built == []  # up to date
    open_prepared(str(tmp_path / "out"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named_or_skipped_and_counted(corpus, tmp_path, damage):
    m = prepare(_cfg(corpus, tmp_path), **QUIET)
    victim = tmp_path / "out" / m.splits["train"].shards[1].file
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=f"shard {victim} is corrupt: .*listed in {tmp_path / 'out' / 'manifest.json'}"):
        open_prepared(str(tmp_path / "out"))
    data = open_prepared(str(tmp_path / "out"), on_corrupt="skip")
    assert len(data.skipped) == 1 and data.skipped[0].startswith(str(victim))
    assert str(victim) not in data.shards["train"]
    assert data.rows["train"] == m.splits["train"].rows - m.splits["train"].shards[1].rows


def test_manifest_checksum_mismatch_and_tokenizer_tampering_are_named(corpus, tmp_path):
    m = prepare(_cfg(corpus, tmp_path), **QUIET)
    manifest_path = tmp_path / "out" / "manifest.json"
    obj = json.loads(manifest_path.read_text())
    obj["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(obj))
    val = tmp_path / "out" / m.splits["val"].shards[0].file
    with pytest.raises(CorruptShardError, match=f"shard {val} is corrupt: SHA-256"):
        open_prepared(str(tmp_path / "out"))
    assert open_prepared(str(tmp_path / "out"), checksums=False).shards["val"][0] == str(val)  # size only
    (tmp_path / "out" / m.tokenizer.file).write_text('{"kind": "bytes", "vocab_size": 256, "eos_id": 1}')
    with pytest.raises(CorruptShardError, match="tokenizer.json is corrupt"):
        open_prepared(str(tmp_path / "out"), on_corrupt="skip")  # never trains with the wrong tokenizer


def test_bad_sources_fail_before_any_work(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "bins").mkdir()
    for i in range(3):
        (tmp_path / "bins" / f"b{i}.txt").write_bytes(np.arange(256, dtype=np.uint8).tobytes())
    with pytest.raises(StorageError, match=f"{tmp_path / 'nope'}: does not exist"):
        prepare(PrepareConfig(source=str(tmp_path / "nope"), path=str(out)), **QUIET)
    with pytest.raises(CorpusError, match=f"source {tmp_path / 'empty'}: no files ending in .py"):
        prepare(PrepareConfig(source=str(tmp_path / "empty"), path=str(out)), **QUIET)
    with pytest.raises(CorpusError, match="none of its 3 matching files is UTF-8 text"):
        prepare(PrepareConfig(source=str(tmp_path / "bins"), path=str(out)), **QUIET)
    assert not out.exists()


def test_prepare_spec_is_a_registered_kind_and_names_bad_fields():
    spec = validate_prepare_spec({"path": "s3://b/x", "tokenizer": "bpe"}, ["vocab_size=4096"])
    assert job_kind("prepare").spec is type(spec) and spec.corpus().vocab_size == 4096
    with pytest.raises(SpecError, match="tokenizer: Input should be 'bytes' or 'bpe'"):
        validate_prepare_spec({"path": "x", "tokenizer": "wordpiece"})
    with pytest.raises(SpecError, match="vocab_size: Input should be less than or equal to 65536"):
        validate_prepare_spec({"path": "x", "vocab_size": 100_000})
    with pytest.raises(SpecError, match="path: Field required"):
        validate_prepare_spec({})


def test_a_changed_corpus_on_s3_keeps_the_set_in_use_and_deletes_the_one_before(corpus, s3_bucket):
    """Issue 24: one retirement for jobs.prepare and the data.source cache, on S3 as on a folder."""
    from workers.data.storage import open_fs

    uri = f"s3://{s3_bucket}/ds"
    first = prepare(PrepareConfig(source=str(corpus), path=uri, shard_bytes=4096), **QUIET)
    (corpus / "new.py").write_text("x = 1\n")
    second = prepare(PrepareConfig(source=str(corpus), path=uri, shard_bytes=4096), **QUIET)
    assert second.retired == sorted(first.files()) and second.origin == "jobs.prepare"
    fs, root = open_fs(uri)
    assert all(fs.get_file_info(f"{root}/{f}").is_file for f in first.files())  # a running job's files stay
    (corpus / "newer.py").write_text("y = 2\n")
    third = prepare(PrepareConfig(source=str(corpus), path=uri, shard_bytes=4096), **QUIET)
    assert third.retired == sorted(second.files())
    left = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/{first.shard_dir}", allow_not_found=True))]
    assert left == []  # shards, done-records and tokenizer of the set two back: gone
    open_prepared(uri)  # the set in use reads whole
