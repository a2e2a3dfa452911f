"""KV-cache generation against the cache-free path, the batched engine against one row at a time,
the text stream's stop and UTF-8 handling, and int8 weights (plain PyTorch, no Ray)."""

from __future__ import annotations

import pytest
import torch

from workers.config import ModelConfig
from workers.moe.model import MoETransformer
from workers.serving.engine import BatchGeneration, RowRequest, TextStream
from workers.serving.int8 import quantize_model

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=48)


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(TINY).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_gives_the_cache_free_tokens(model, temperature):
    """Same seed, same tokens; 12 new tokens after 40 run past max_seq_len (48), where the cached
    path must fall back to recomputing the shifting window exactly as the cache-free one does."""
    idx = torch.randint(1, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    outs = [model.generate(idx, 12, temperature=temperature, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(7)) for use_cache in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (3, 52)


def test_cached_logits_match_a_full_forward(model):
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2)
    with torch.no_grad():
        pieces = [model(idx[:, a:b], cache) for a, b in ((0, 12), (12, 13), (13, 20))]
        full = model(idx)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths_B.tolist() == [20, 20]


def _rows(temperature: float) -> list[RowRequest]:
    prompts = [b"def ", b"import os\n", b"x", b"class Foo(object):\n    "]
    return [RowRequest((0, *p), max_tokens=12 + 3 * i, temperature=temperature, top_p=0.9, stop=(), seed=100 + i)
            for i, p in enumerate(prompts)]


def _run(model: MoETransformer, rows: list[RowRequest]) -> list[tuple[str, int, str | None]]:
    gen = BatchGeneration(model, rows)
    texts, last = [""] * len(rows), [None] * len(rows)
    while not gen.done:
        for i, chunk in gen.step().items():
            texts[i] += chunk.text
            last[i] = chunk
    return [(t, c.completion_tokens, c.finish_reason) for t, c in zip(texts, last, strict=True)]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_rows_equal_rows_alone(model, temperature):
    """Rows of different prompt lengths and max_tokens in one batch (a padded prefill, rows leaving
    the cache as they finish) give what each gives alone with the same seed."""
    rows = _rows(temperature)
    together = _run(model, rows)
    alone = [_run(model, [row])[0] for row in rows]
    assert together == alone
    assert [n for _, n, _ in together] == [r.max_tokens for r in rows] or any(f == "stop" for *_, f in together)


def test_greedy_engine_matches_generate(model):
    row = RowRequest((0, *b"def "), max_tokens=20, temperature=0.0, top_p=1.0, stop=(), seed=0)
    text, n, finish = _run(model, [row])[0]
    ref = model.generate(torch.tensor([row.tokens]), 20, temperature=0.0)[0, len(row.tokens):].tolist()
    ref = ref[: ref.index(0)] if 0 in ref else ref
    assert text == bytes(ref).decode("utf-8", errors="replace")


def test_text_stream_holds_partial_characters_and_stops():
    stream = TextStream(stop=("END",))
    out = [stream.push(b) for b in "é E".encode()]
    assert out == ["", "é", " ", ""]  # é is two bytes; "E" may start "END"
    assert stream.push(ord("x")) == "Ex"
    assert [stream.push(b) for b in b"ab END"] == ["a", "b", " ", "", "", ""] and stream.stopped
    tail = TextStream(stop=())
    tail.push(0xC3)
    assert tail.flush() == "\ufffd"  # an incomplete character at the end becomes U+FFFD


def test_int8_covers_the_experts_and_stays_close():
    torch.manual_seed(3)
    fp32 = MoETransformer(ModelConfig()).eval()
    q = MoETransformer(ModelConfig()).eval()
    q.load_state_dict(fp32.state_dict())
    report = quantize_model(q)
    assert report.share >= 0.9
    assert not any(p.dtype == torch.float32 and p.dim() == 3 for p in q.parameters())  # no float (E, D, F) left
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, out = fp32(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
