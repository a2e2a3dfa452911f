"""What OpenAI clients and operators reach for (issue #25), end to end: a real local Ray cluster,
Ray Serve on a loopback port, random-weight checkpoints, the real ``openai`` client, and responses
validated against the ``openai`` package's own types. Chat completions (plain, streamed, ``n``,
``stop``, ``seed``, ``max_completion_tokens``, usage), logprobs and echo for prompt scoring, a
dropped stream freeing its row, and the replicas' metrics in a real scrape of Ray's metrics agent.
About 90 s on 2 cores.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import ray
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from jobs.runtime.serving import deploy
from jobs.specs.serve import ServeSpec
from tests.bench.serving import write_checkpoint
from tests.browser.test_grafana import serving_metrics_on_the_dashboard
from workers.config import ModelConfig
from workers.serving.config import AutoscalingSpec, LimitsConfig
from workers.serving.metrics import EXPORTED
from workers.waiting import wait_until

pytestmark = pytest.mark.ray

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=64)
# Long enough to drop mid-stream: 2000 greedy tokens take seconds.
LONG = ModelConfig(d_model=64, n_layers=2, n_heads=2, expert_hidden=64, max_seq_len=2048)
LONG_TOKENS = 2000
KEY = "key-openai-0123456789"
TIMEOUT_S = 60.0


@dataclass
class Env:
    base: str  # the chat deployment's OpenAI base URL
    long_base: str  # the long-context deployment's
    metrics_url: str
    ckpt: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=KEY, max_retries=0, timeout=TIMEOUT_S)

    def post(self, route: str, body: dict, base: str | None = None) -> httpx.Response:
        return httpx.post(f"{base or self.base}/{route}", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _endless_checkpoint(path):
    """A checkpoint whose greedy continuation never ends the document: the end-of-document token's
    embedding, which the tied LM head scores it with, is zero, so its logit is 0 while the most
    likely of the 255 others is above 0."""
    write_checkpoint(path, LONG, seed=3)
    state = torch.load(path / "model.pt", weights_only=True)
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in state:
            state[name][0] = 0.0
    torch.save(state, path / "model.pt")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tmp_path_factory.mktemp("openai")
    ckpt = write_checkpoint(tmp / "chat", TINY, seed=0)
    long_ckpt = _endless_checkpoint(tmp / "long")
    metrics_port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    port = _free_port()
    try:
        # Only a checkpoint: limits derived from its context (max_tokens 32, default 16).
        base = deploy(ServeSpec(name="chat", checkpoint=str(ckpt), num_cpus=0), KEY, http_port=port).base_url
        long_base = deploy(ServeSpec(name="long", checkpoint=str(long_ckpt), num_cpus=0, route_prefix="/long",
                                     autoscaling=AutoscalingSpec(), limits=LimitsConfig(max_tokens=LONG_TOKENS)),
                           KEY, http_port=port).base_url
        yield Env(base, long_base, f"http://127.0.0.1:{metrics_port}/metrics", str(ckpt))
    finally:
        serve.shutdown()
        ray.shutdown()


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f"}]
TRANSCRIPT = "system: Be brief.\nuser: def f\nassistant:"  # the default template's rendering


def test_chat_is_a_completion_of_the_rendered_transcript(env):
    client = env.client()
    answer = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16, temperature=0)
    raw = env.post("chat/completions", {"messages": MESSAGES, "max_tokens": 16, "temperature": 0})
    ChatCompletion.model_validate(raw.json())
    same = client.completions.create(model="chat", prompt=TRANSCRIPT, max_tokens=16, temperature=0,
                                     stop=["\nuser:"])
    assert answer.choices[0].message.content == same.choices[0].text == raw.json()["choices"][0]["message"]["content"]
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    assert answer.usage.prompt_tokens == len(TRANSCRIPT) + 1  # byte tokens after the EOS


def test_chat_stream_n_seed_stop_and_usage(env):
    client = env.client()
    kwargs = dict(model="chat", messages=MESSAGES, max_completion_tokens=20, temperature=1.0, seed=7, n=2,
                  stop=["}"])
    whole = client.chat.completions.create(**kwargs)
    ChatCompletion.model_validate(env.post("chat/completions", {**kwargs, "model": "chat"}).json())
    parts, roles, usage = {0: "", 1: ""}, set(), None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        ChatCompletionChunk.model_validate(chunk.model_dump())
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            roles |= {c.delta.role} - {None}
        usage = chunk.usage or usage
    assert [parts[0], parts[1]] == [c.message.content for c in whole.choices] and parts[0] != parts[1]
    assert roles == {"assistant"} and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage == whole.usage and all("}" not in p for p in parts.values())
    r = env.post("chat/completions", {"messages": MESSAGES, "max_completion_tokens": 33})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_completion_tokens"]
    assert "limit of 32" in r.json()["detail"][0]["msg"]  # half the context, derived
    assert env.post("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}).json()["detail"][0]["loc"] == [
        "body", "top_logprobs"]


def test_echo_with_max_tokens_0_scores_the_prompt_as_score_does(env):
    """A multiple-choice harness's request: each answer appended to the question, scored, nothing
    generated; the scores are /v1/score's, and the best answer is the same either way."""
    client = env.client()
    answers = ["Paris", "Rome"]
    out = client.completions.create(model="chat", prompt=[f"Capital: {a}" for a in answers], max_tokens=0,
                                    echo=True, logprobs=1)
    Completion.model_validate(env.post("completions", {"prompt": "Capital: Paris", "max_tokens": 0, "echo": True,
                                                       "logprobs": 1}).json())
    for choice, answer in zip(out.choices, answers, strict=True):
        score = env.post("score", {"text": f"Capital: {answer}"}).json()
        assert choice.text == f"Capital: {answer}" and choice.logprobs.tokens == list(f"Capital: {answer}")
        assert choice.logprobs.token_logprobs == pytest.approx(score["logprobs"], abs=1e-4)
        assert choice.logprobs.text_offset == list(range(len(choice.text)))
    assert out.usage.completion_tokens == 0
    r = env.post("completions", {"prompt": "x", "max_tokens": 0})
    assert r.status_code == 422 and "echo" in r.json()["detail"][0]["msg"]


def test_logprobs_of_generated_tokens_plain_and_streamed(env):
    client = env.client()
    out = client.completions.create(model="chat", prompt="ab", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == out.usage.completion_tokens and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(max(top.values()) == pytest.approx(x) for top, x in zip(lp.top_logprobs, lp.token_logprobs,
                                                                          strict=True))  # greedy: the top one
    streamed = [c.choices[0].logprobs.token_logprobs[0] for c in client.completions.create(
        model="chat", prompt="ab", max_tokens=6, temperature=0, logprobs=3, stream=True) if c.choices]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)
    chat = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def _stats(env: Env) -> dict:
    return httpx.get(f"{env.long_base}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).json()


def _wait(what: str, check, timeout_s: float = 30.0):
    return wait_until(check, timeout_s=timeout_s, interval_s=0.1, what=what)


def test_a_dropped_stream_frees_its_row_at_the_next_token(env):
    before = _stats(env)["tokens_generated"]
    body = {"prompt": "loop: ", "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{env.long_base}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=TIMEOUT_S) as r:
        lines = r.iter_lines()  # one iterator, kept: dropping it would close the connection
        assert sum(line.startswith("data: ") for line in itertools.islice(lines, 20)) == 10
        assert _stats(env)["running_rows"] == 1
        time.sleep(0.5)
        assert _stats(env)["running_rows"] == 1  # still generating while the client holds on
    _wait("the dropped row left its batch", lambda: _stats(env)["running_rows"] == 0)
    stopped_at = _stats(env)["tokens_generated"]
    time.sleep(1.0)
    assert _stats(env)["tokens_generated"] == stopped_at  # none for it afterwards
    print(f"dropped stream: {stopped_at - before} of {LONG_TOKENS} tokens generated")
    assert stopped_at - before < LONG_TOKENS


def test_the_replicas_metrics_reach_a_real_scrape(env):
    env.client().chat.completions.create(model="chat", messages=MESSAGES, max_tokens=4)
    httpx.post(f"{env.base}/completions", content=b'{"prompt": "x", "temperature": NaN}', timeout=TIMEOUT_S,
               headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})  # a 422, counted

    def scraped() -> set[str] | None:
        text = httpx.get(env.metrics_url, timeout=TIMEOUT_S).text
        families = list(text_string_to_metric_families(text))
        names = {s.name for f in families for s in f.samples if s.labels.get("deployment") == "chat"}
        answered = {(s.labels.get("route"), s.labels.get("status")) for f in families for s in f.samples
                    if s.name == "ray_serving_requests_total" and s.labels.get("deployment") == "chat"}
        counters = {m for m in EXPORTED if m.endswith("_total")}
        histograms = {f"{m}_{part}" for m in set(EXPORTED) - counters for part in ("bucket", "sum", "count")}
        wanted = counters | histograms | serving_metrics_on_the_dashboard()
        return names if wanted <= names and {("/v1/chat/completions", "200"),
                                             ("/v1/completions", "422")} <= answered else None

    _wait("every serving metric, labelled by deployment, requests by route and status", scraped, timeout_s=60)
