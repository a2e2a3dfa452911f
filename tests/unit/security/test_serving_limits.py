"""A serving replica's bounds and checkpoint confinement, in-process (the replica class itself, no
Ray Serve; tests/integration/security/test_serving_limits.py runs them behind Serve's HTTP proxy): an over-long
prompt is refused before anything is tokenized, the bound it uses holds for byte-level BPE, and a
replica loads only checkpoint files under its job's data roots. About 10 s."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from fastapi import HTTPException

from tests.bench.serving import write_checkpoint
from workers.checkpoint import TOKENIZER_FILE
from workers.config import ModelConfig
from workers.confine import ROOTS_ENV, OutsideRoots, env_value
from workers.data.tokenizer import ByteTokenizer, train_bpe
from workers.serving.app import CompletionServer
from workers.serving.config import LimitsConfig, ReplicaConfig
from workers.serving.schemas import CompletionRequest, ScoreRequest
from workers.serving.tokens import encode_prompt, max_token_bytes

CONTEXT = 64
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, expert_hidden=16, max_seq_len=CONTEXT)
CORPUS = ["def add(x, y):\n    return x + y\n" * 40, "héllo wörld, ça va? naïve café 日本語 😀\n" * 40]


def _replica(checkpoint: Path):
    config = ReplicaConfig(name="m", checkpoint=str(checkpoint), key_sha256=hashlib.sha256(b"k").hexdigest(),
                           limits=LimitsConfig(max_tokens=16, default_max_tokens=8))
    return CompletionServer.func_or_class.__bases__[0](config.model_dump())  # under Serve's ingress wrapper


class Recording:
    """The replica's tokenizer, recording every text it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def encode_docs(self, docs):
        self.seen += docs
        return self.inner.encode_docs(docs)


def _completion_rows(server, req: CompletionRequest):
    """The rows of a completions request, as the completions route asks the replica for them."""
    prompts = req.prompts()
    locs = [["prompt"] if isinstance(req.prompt, str) else ["prompt", i] for i in range(len(prompts))]
    return server._rows(req, list(zip(prompts, locs, strict=True)), req.max_tokens, "max_tokens")


def test_an_over_long_prompt_is_refused_before_any_prompt_is_tokenized(tmp_path):
    server = _replica(write_checkpoint(tmp_path / "ckpt", TINY, seed=0))
    server.tokenizer = Recording(server.tokenizer)
    budget = CONTEXT - 1 - 8  # after the EOS that starts a prompt and the default max_tokens
    with pytest.raises(HTTPException) as e:
        _completion_rows(server, CompletionRequest(prompt=["fits", "x" * (budget + 1)]))
    assert e.value.status_code == 422 and e.value.detail[0]["loc"] == ["body", "prompt", 1]
    assert f"{budget + 1} characters cannot fit the {budget} tokens" in e.value.detail[0]["msg"]
    assert server.tokenizer.seen == []  # not even the first prompt, which fits
    with pytest.raises(HTTPException) as e:
        asyncio.run(server.score(ScoreRequest(text="y" * CONTEXT)))
    assert e.value.detail[0]["loc"] == ["body", "text"] and server.tokenizer.seen == []
    batch = _completion_rows(server, CompletionRequest(prompt="x" * budget))  # the longest that fits
    assert len(batch.prompts[0]) == CONTEXT - 8 and server.tokenizer.seen == [b"x" * budget]


def test_max_token_bytes_bounds_what_a_bpe_token_stands_for():
    bpe = train_bpe(CORPUS, 320)
    most = max_token_bytes(bpe)
    assert max_token_bytes(ByteTokenizer()) == 1 and most > 1
    for text in [*CORPUS, "naïve café 日本語 😀 " * 30, "<|endoftext|>" * 20, "zzzz" * 50]:
        n_tokens = len(encode_prompt(bpe, text)) - 1  # without the EOS that starts it
        assert n_tokens * most >= len(text.encode()) >= len(text)  # so len(text) > n * most means > n tokens


def test_a_replica_loads_only_files_under_its_roots(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    ckpt = write_checkpoint(mine / "ckpt", TINY, seed=0)
    (ckpt / TOKENIZER_FILE).write_text(ByteTokenizer().to_json())
    other = write_checkpoint(theirs / "ckpt", TINY, seed=1)
    monkeypatch.setenv(ROOTS_ENV, env_value([str(mine)]))
    assert _replica(ckpt).context == CONTEXT  # its own checkpoint, confined
    (ckpt / "model.pt").unlink()
    (ckpt / "model.pt").symlink_to(other / "model.pt")
    with pytest.raises(OutsideRoots, match=r"mine/ckpt/model.pt resolves to .*theirs/ckpt/model.pt"):
        _replica(ckpt)
    monkeypatch.delenv(ROOTS_ENV)
    assert _replica(ckpt).context == CONTEXT  # unconfined (an admin's deployment): read as before
