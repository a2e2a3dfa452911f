"""The serving pieces without Ray (issue #25): the chat template, request bodies that must be 422s
naming the field (NaN, lone surrogates, wrong types, huge lists) through the app's own error
renderer, the engine's log-probabilities and cancelled rows, the OpenAI logprobs shapes, and
limits fitted to a checkpoint's context. Seconds."""

from __future__ import annotations

import json

import openai.types as ot
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from jobs.specs.base import SpecError
from jobs.specs.serve import checkpoint_context, fit_limits
from workers.config import ModelConfig
from workers.data.tokenizer import ByteTokenizer
from workers.moe.model import MoETransformer
from workers.serving.chat import ChatCompletionRequest, ChatMessage, checkpoint_template, render
from workers.serving.config import ChatTemplate, LimitsConfig
from workers.serving.engine import BatchGeneration, RowRequest, prompt_logprobs
from workers.serving.http import EXCEPTION_HANDLERS
from workers.serving.logprobs import chat_logprobs, completion_logprobs, token_text
from workers.serving.prefix import PrefixCache
from workers.serving.schemas import CompletionRequest
from workers.serving.tokens import token_pieces

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=48)
PIECES = token_pieces(ByteTokenizer(), 256)


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(TINY).eval()


def test_default_template_is_a_transcript_ending_where_the_answer_starts():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi {role}")]
    assert render(ChatTemplate(), messages) == "system: Be brief.\nuser: Hi {role}\nassistant:"
    custom = ChatTemplate(message="<{role}>{content}</{role}>", generation_prompt="<assistant>", stop=("</",))
    parts = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert render(custom, [parts]) == "<user>ab</user><assistant>"
    with pytest.raises(ValueError, match=r"\{content\}"):
        ChatTemplate(message="{role}")


def test_a_checkpoints_template_file_is_read_and_a_bad_one_named(tmp_path):
    assert checkpoint_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"message": "{content}\n", "generation_prompt": ">"}))
    assert checkpoint_template(tmp_path) == ChatTemplate(message="{content}\n", generation_prompt=">")
    (tmp_path / "chat_template.json").write_text(json.dumps({"message": "no slot"}))
    with pytest.raises(ValueError, match="chat_template.json"):
        checkpoint_template(tmp_path)


def _app() -> TestClient:
    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)

    @app.post("/c")
    def completions(req: CompletionRequest) -> dict:
        return {"ok": True}

    @app.post("/chat")
    def chat(req: ChatCompletionRequest) -> dict:
        return {"ok": True}

    return TestClient(app)


@pytest.mark.parametrize(("path", "raw", "loc"), [
    ("/c", b'{"prompt": "x", "temperature": NaN}', ["body", "temperature"]),
    ("/c", b'{"prompt": "x", "top_p": Infinity}', ["body", "top_p"]),
    ("/c", b'{"prompt": "x\\ud800"}', ["body", "prompt"]),
    ("/c", b'{"prompt": "x", "stop": ["ok", "\\udfff"]}', ["body", "stop"]),
    ("/c", b'{"prompt": "x", "model": "\\ud800"}', ["body", "model"]),
    ("/c", b'{"prompt": {"a": [1, NaN]}}', ["body", "prompt", "str"]),
    ("/c", b'{"prompt": "x", "n": "many"}', ["body", "n"]),
    ("/c", b'{"prompt": "x", "logprobs": 21}', ["body", "logprobs"]),
    ("/c", b'{"prompt": [' + b", ".join([b'""'] * 600) + b"]}", ["body", "prompt", "list[str]"]),
    ("/chat", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', ["body", "messages", 0, "content"]),
    ("/chat", b'{"messages": [{"role": "robot", "content": "x"}]}', ["body", "messages", 0, "role"]),
    ("/chat", b'{"messages": []}', ["body", "messages"]),
    ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', ["body", "temperature"]),
    ("/c", b'{"prompt": "\xff"}', ["body", 12]),  # not UTF-8: FastAPI's own answer is a bare 400
])
def test_bad_bodies_are_422s_naming_the_field_in_strict_json(path, raw, loc):
    r = _app().post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = json.loads(r.content.decode("ascii"), parse_constant=lambda t: pytest.fail(f"non-JSON token {t}"))
    assert loc in [e["loc"] for e in errors["detail"]], errors


def test_deep_nesting_and_huge_error_lists_stay_4xx():
    client = _app()
    r = client.post("/c", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    r = client.post("/c", content=json.dumps({"prompt": [1] * 500}), headers={"content-type": "application/json"})
    assert r.status_code == 422 and len(r.json()["detail"]) <= 20


def _run(model: MoETransformer, rows: list[RowRequest]) -> tuple[BatchGeneration, list[list]]:
    gen = BatchGeneration(model, rows)
    chunks: list[list] = [[] for _ in rows]
    while not gen.done:
        for i, chunk in gen.step().items():
            chunks[i].append(chunk)
    return gen, chunks


def test_logprobs_are_the_models_and_top_k_is_sorted(model):
    row = RowRequest((0, *b"def "), max_tokens=6, temperature=0.0, top_p=1.0, stop=(), seed=0, logprobs=3)
    _, [chunks] = _run(model, [row])
    tokens = list(row.tokens) + [c.token for c in chunks]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)
    for t, c in enumerate(chunks):
        pos = len(row.tokens) - 1 + t
        assert c.logprob == pytest.approx(float(logp[pos, c.token]), abs=1e-4)
        assert [tok for tok, _ in c.top] == logp[pos].topk(3).indices.tolist()
        assert c.top[0][0] == c.token  # greedy: the most likely one
    scores = prompt_logprobs(model, tokens, 2)
    assert [lp for lp, _ in scores] == pytest.approx([float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1)],
                                                     abs=1e-4)
    plain = RowRequest((0, *b"x"), max_tokens=2, temperature=0.0, top_p=1.0, stop=(), seed=0)
    assert all(c.logprob is None and c.top == () for c in _run(model, [plain])[1][0])


def test_a_cancelled_row_leaves_at_the_next_step(model):
    rows = [RowRequest((0, *p), max_tokens=20, temperature=0.0, top_p=1.0, stop=(), seed=0) for p in (b"ab", b"cd")]
    gen = BatchGeneration(model, rows)
    gen.step()
    rows[0].cancelled.set()
    out = gen.step()
    assert 0 not in out and gen.running == [1] and gen.cache.k_NBHLC.shape[1] == 1
    alone = _run(model, [RowRequest((0, *b"cd"), max_tokens=20, temperature=0.0, top_p=1.0, stop=(), seed=0)])[1][0]
    rest = [out[1]] + [c for c in iter(lambda: gen.step().get(1), None)]
    assert [c.token for c in rest] == [c.token for c in alone[1:len(rest) + 1]]  # the other row is unaffected


def test_logprob_shapes_validate_as_openais_own():
    assert token_text(PIECES, ord("a")) == "a" and token_text(PIECES, 0xC3) == "bytes:\\xc3"
    scored = [(ord("h"), -0.5, ((ord("h"), -0.5), (0xC3, -1.0))), (ord("i"), -0.25, ((ord("i"), -0.25),))]
    lp = completion_logprobs(PIECES, scored, offset=3)
    ot.completion_choice.Logprobs.model_validate(lp.model_dump())
    assert lp.tokens == ["h", "i"] and lp.text_offset == [3, 4] and lp.top_logprobs[0] == {"h": -0.5, "bytes:\\xc3": -1}
    chat = chat_logprobs(PIECES, scored)
    ot.chat.chat_completion.ChoiceLogprobs.model_validate(chat.model_dump())
    assert chat.content[0].bytes == [ord("h")] and chat.content[0].top_logprobs[1].bytes == [0xC3]


def test_limits_fit_the_checkpoints_context(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": 2, "model": {"max_seq_len": 128}}))
    assert checkpoint_context(str(tmp_path)) == 128
    fitted = fit_limits(LimitsConfig(), 128)
    assert (fitted.max_tokens, fitted.default_max_tokens) == (64, 16)
    assert fit_limits(LimitsConfig(), 8).default_max_tokens == 4
    assert fit_limits(LimitsConfig(max_tokens=100), 128).max_tokens == 100  # set: kept when it fits
    with pytest.raises(SpecError, match=r"^limits.max_tokens: 256 must be below the model's context \(128"):
        fit_limits(LimitsConfig(max_tokens=256), 128)
    with pytest.raises(SpecError, match=r"^limits.default_max_tokens: 100"):
        fit_limits(LimitsConfig(default_max_tokens=100), 128)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(SpecError, match="^checkpoint: .*meta.json cannot be read"):
        checkpoint_context(str(tmp_path))


def test_prefix_reuse_gives_the_same_tokens_and_saves_the_prefill(model):
    """Rows sharing a 35-token prefix: the second batch copies its two cached 16-token blocks and
    prefills only the rest, with the tokens and logprobs a cache-free run gives."""
    shared = list(range(1, 35))
    rows = lambda: [RowRequest((0, *shared, *tail), max_tokens=6, temperature=0.0, top_p=1.0, stop=(), seed=0,  # noqa: E731
                               logprobs=0) for tail in ([50, 51], [60], [70, 71, 72])]
    plain = [[(c.token, c.logprob) for c in cs] for cs in _run(model, rows())[1]]
    prefixes = PrefixCache(max_bytes=2**24)
    BatchGeneration(model, rows()[:1], prefixes=prefixes).step()  # caches the first prompt's blocks
    assert prefixes.hit_tokens == 0 and len(prefixes.blocks) == 2  # 37 tokens: 2 whole blocks before the last
    gen = BatchGeneration(model, rows(), prefixes=prefixes)
    reused: list[list] = [[] for _ in range(3)]
    while not gen.done:
        for i, c in gen.step().items():
            reused[i].append((c.token, c.logprob))
    assert prefixes.hit_tokens == 3 * 32
    assert [[t for t, _ in r] for r in reused] == [[t for t, _ in p] for p in plain]
    assert [lp for r in reused for _, lp in r] == pytest.approx([lp for p in plain for _, lp in p], abs=1e-4)
    small = PrefixCache(max_bytes=1)
    small.store(rows()[0].tokens, gen.cache.k_NBHLC[:, 0], gen.cache.v_NBHLC[:, 0])
    assert small.bytes <= 1 and not small.blocks  # bounded: evicted at once
