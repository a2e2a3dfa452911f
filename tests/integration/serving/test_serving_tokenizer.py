"""Serving and sampling with the tokenizer a checkpoint stores: a tiny byte-level BPE checkpoint
(random weights) served in-process, without Ray Serve (the replica class itself, its batch handler
run on this event loop), from a folder and from an s3:// prefix on the session's S3-protocol server.
About 5 s."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from jobs.specs.base import SpecError
from jobs.specs.serve import checkpoint_context, resolve_s3_checkpoint
from tests.bench.serving import write_checkpoint
from workers.checkpoint import TOKENIZER_FILE, load_model
from workers.config import ModelConfig
from workers.data import EOS_TOKEN
from workers.data.storage import open_fs
from workers.data.tokenizer import BpeTokenizer, train_bpe
from workers.sampling import sample_text
from workers.serving.app import CompletionServer
from workers.serving.config import LimitsConfig, ReplicaConfig
from workers.serving.engine import BatchGeneration, RowRequest
from workers.serving.schemas import CompletionRequest, ScoreRequest
from workers.serving.tokens import encode_prompt, token_pieces

# Code and non-ASCII text, so that merges span multi-byte characters and single-byte tokens of
# characters exist (a piece that is not valid UTF-8 alone).
CORPUS = ["def add(x, y):\n    return x + y\n" * 40, "héllo wörld, ça va? naïve café\n" * 40,
          "日本語のテキスト 😀 emoji\n" * 40, "import os\nclass Foo(object):\n    pass\n" * 40]
BPE_VOCAB = 320
PROMPT = "def café(x):"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return train_bpe(CORPUS, BPE_VOCAB)


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, bpe) -> Path:
    config = ModelConfig(vocab_size=bpe.vocab_size, d_model=32, n_layers=2, n_heads=2, expert_hidden=32,
                         max_seq_len=64)
    path = write_checkpoint(tmp_path_factory.mktemp("bpe") / "ray-train" / "step-00000004", config, seed=0)
    (path / TOKENIZER_FILE).write_text(bpe.to_json())
    return path


def _greedy_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), n, temperature=0.0)[0, len(prompt_ids):].tolist()
    return out[: out.index(EOS_TOKEN)] if EOS_TOKEN in out else out


def _server(checkpoint: str):
    config = ReplicaConfig(name="bpe", checkpoint=checkpoint, key_sha256=hashlib.sha256(b"k").hexdigest(),
                           limits=LimitsConfig(max_tokens=32, default_max_tokens=8))
    replica_class = CompletionServer.func_or_class.__bases__[0]  # the class under Serve's ingress wrapper
    assert replica_class.__module__ == "workers.serving.app"
    return replica_class(config.model_dump())


def test_pieces_are_the_bytes_of_every_token(bpe):
    pieces = token_pieces(bpe, bpe.vocab_size + 4)  # a model vocabulary larger than the tokenizer's
    assert pieces[EOS_TOKEN] == b"" and pieces[-4:] == [b""] * 4
    for text in [*CORPUS, PROMPT, "ünseen wörds 🙂"]:
        ids = encode_prompt(bpe, text)
        assert ids[0] == EOS_TOKEN
        assert b"".join(pieces[i] for i in ids) == text.encode()
    broken = [p for p in pieces if p and not _decodes(p)]
    assert broken, "no token holds part of a character: the corpus does not exercise partial characters"


def _decodes(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_engine_streams_bpe_text_exactly(bpe, bpe_checkpoint):
    model = load_model(bpe_checkpoint)
    prompt = encode_prompt(bpe, PROMPT)
    row = RowRequest(tuple(prompt), max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, stop=(), seed=0)
    gen = BatchGeneration(model, [row], token_pieces(bpe, model.config.vocab_size))
    chunks = []
    while not gen.done:
        chunks += gen.step().values()
    ref = _greedy_ids(model, prompt, MAX_TOKENS)
    assert "".join(c.text for c in chunks) == bpe.decode(ref)
    assert chunks[-1].completion_tokens == len(ref) + (len(ref) < MAX_TOKENS)  # + the EOS that ended it


def test_samples_decode_with_the_checkpoints_tokenizer(bpe, bpe_checkpoint):
    model = load_model(bpe_checkpoint)
    [text] = sample_text(model, bpe, prompts=("def ",), max_tokens=12, temperature=1e-6, seed=0)
    prompt = encode_prompt(bpe, "def ")[1:]
    assert text == bpe.decode(prompt + _greedy_ids(model, prompt, 12))
    assert text.startswith("def ")


def _complete(server, req: CompletionRequest) -> tuple[str, int]:
    """The replica's text and prompt tokens for ``req``, its batch handler run on this event loop
    (Serve's own batching needs a replica context)."""
    batch = server._rows(req, [(req.prompt, ["prompt"])], req.max_tokens, "max_tokens")

    async def run() -> str:
        text = ""
        async for step in server._run_batch(batch.rows):
            text += "".join(chunk.text for chunk in step if chunk is not StopIteration)
        return text

    return asyncio.run(run()), batch.prompt_tokens


def test_replica_counts_and_decodes_bpe_tokens(bpe, bpe_checkpoint):
    server = _server(str(bpe_checkpoint))
    assert server.tokenizer.kind == "bpe"
    text, prompt_tokens = _complete(server, CompletionRequest(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0))
    prompt = encode_prompt(bpe, PROMPT)
    assert len(prompt) - 1 < len(PROMPT.encode())  # BPE: fewer tokens than bytes, and usage says so
    assert prompt_tokens == len(prompt)
    assert text == bpe.decode(_greedy_ids(server.model, prompt, MAX_TOKENS))
    score = asyncio.run(server.score(ScoreRequest(text=PROMPT)))
    assert score.tokens == prompt[1:] and score.n_tokens == len(prompt) - 1


def test_replica_loads_an_s3_checkpoint(bpe, bpe_checkpoint, s3_bucket, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bpe_checkpoint, run / "ray-train" / "step-00000004")
    older = write_checkpoint(run / "ray-train" / "step-00000002", load_model(bpe_checkpoint).config, seed=5)
    (older / TOKENIZER_FILE).write_text(bpe.to_json())
    fs, root = open_fs(f"s3://{s3_bucket}/runs")
    pafs.copy_files(str(run), f"{root}/a", destination_filesystem=fs)
    latest = f"s3://{s3_bucket}/runs/a/ray-train/step-00000004"
    assert resolve_s3_checkpoint(f"s3://{s3_bucket}/runs/a") == latest  # a run prefix: its newest step
    assert resolve_s3_checkpoint(latest) == latest and checkpoint_context(latest) == 64
    with pytest.raises(SpecError, match="neither a checkpoint"):
        resolve_s3_checkpoint(f"s3://{s3_bucket}/runs/none")
    remote, local = _server(latest), _server(str(bpe_checkpoint))
    assert remote.tokenizer.to_json() == bpe.to_json()
    for name, weight in local.model.state_dict().items():
        assert torch.equal(weight, remote.model.state_dict()[name]), name
    ask = CompletionRequest(prompt=PROMPT, max_tokens=8, temperature=0)
    assert _complete(remote, ask) == _complete(local, ask)
