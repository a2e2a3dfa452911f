"""Serving end to end: a real local Ray cluster, Ray Serve on a loopback port, tiny random-weight
checkpoints, the real ``openai`` client. One Serve instance and its applications are shared by the
module (Serve and its replicas take most of the time on 2 cores); the tests that change an
application (rolling update, replica kill) run last.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import ray
import torch
from ray import serve

from jobs.runtime.serving import deploy, status
from jobs.specs.serve import ServeSpec, key_hash
from tests.bench.serving import write_checkpoint
from workers.checkpoint import load_model
from workers.config import ModelConfig
from workers.serving.config import AutoscalingSpec, BatchingConfig, LimitsConfig
from workers.waiting import wait_until

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=64)
KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-0123456789"
REQUEST_TIMEOUT_S = 60.0  # per request: a request that hangs fails the test instead of blocking it
# The autoscaling test's load: bounded in requests and in time.
AUTOSCALE_MAX_REQUESTS, AUTOSCALE_TIMEOUT_S = 400, 120.0


@dataclass
class Env:
    port: int
    tmp: Path
    ckpt_a: Path
    ckpt_b: Path
    base_a: str
    base_b: str

    def client(self, base: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(name: str, ckpt: Path, replicas: int) -> ServeSpec:
    return ServeSpec(name=name, checkpoint=str(ckpt), num_cpus=0,
                     batching=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=2),
                     autoscaling=AutoscalingSpec(min_replicas=replicas, max_replicas=replicas),
                     limits=LimitsConfig(max_tokens=32, default_max_tokens=8))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tmp_path_factory.mktemp("serving")
    ckpt_a = write_checkpoint(tmp / "a", TINY, seed=0)
    ckpt_b = write_checkpoint(tmp / "run-b" / "ray-train" / "step-00000010", TINY, seed=1)
    write_checkpoint(tmp / "run-b" / "ray-train" / "step-00000002", TINY, seed=9)  # older: not chosen
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = _free_port()
    try:
        a = deploy(_spec("alpha", ckpt_a, 1), KEY_A, http_port=port)
        b = deploy(_spec("beta", tmp / "run-b", 2), KEY_B, http_port=port)  # a run folder: its latest checkpoint
        assert b.checkpoint == str(ckpt_b.resolve()) and a.api_key is None
        yield Env(port, tmp, ckpt_a, ckpt_b, a.base_url, b.base_url)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_models_and_auth(env):
    assert [m.id for m in env.client(env.base_a, KEY_A).models.list().data] == ["alpha"]
    with pytest.raises(openai.AuthenticationError):
        env.client(env.base_a, KEY_B).models.list()  # beta's key does not open alpha
    r = httpx.post(f"{env.base_a}/completions", json={"prompt": "x"}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 401


def test_completion_is_the_models_greedy_continuation(env):
    out = env.client(env.base_a, KEY_A).completions.create(model="alpha", prompt="def ", max_tokens=20,
                                                            temperature=0)
    model = load_model(env.ckpt_a)
    ref = model.generate(torch.tensor([[0, *b"def "]]), 20, temperature=0.0)[0, 5:].tolist()
    ref = ref[: ref.index(0)] if 0 in ref else ref
    assert out.choices[0].text == bytes(ref).decode("utf-8", errors="replace")
    assert out.usage.prompt_tokens == 5 and 1 <= out.usage.completion_tokens <= 20
    assert out.usage.total_tokens == 5 + out.usage.completion_tokens


def test_stream_equals_the_whole_answer(env):
    client = env.client(env.base_a, KEY_A)
    kwargs = dict(model="alpha", prompt=["import ", "class "], max_tokens=24, temperature=0.9, seed=5, n=2)
    whole = client.completions.create(**kwargs)
    parts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [parts[i] for i in range(4)] == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert parts[0] != parts[1]  # choices of one prompt get different seeds
    assert set(finish.values()) <= {"stop", "length"} and len(finish) == 4
    raw = httpx.post(f"{env.base_a}/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                     json={"prompt": "a", "max_tokens": 3, "stream": True}, timeout=REQUEST_TIMEOUT_S)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"prompt": "x" * 60, "max_tokens": 8}, "prompt", "context of 64"),
    ({"prompt": "x", "max_tokens": 33}, "max_tokens", "limit of 32"),
    ({"prompt": "", "max_tokens": 4}, "prompt", "empty"),
    ({"prompt": "ok \ud800", "max_tokens": 4}, "prompt", "UTF-8"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
])
def test_bad_input_is_a_422_naming_the_field(env, body, field, words):
    content = httpx.Request("POST", "http://x", json=body).content if "\ud800" not in body["prompt"] else \
        b'{"prompt": "ok \\ud800", "max_tokens": 4}'
    r = httpx.post(f"{env.base_a}/completions", content=content, timeout=REQUEST_TIMEOUT_S,
                   headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][:2] == ["body", field] and words in detail["msg"]


def test_score_matches_the_model(env):
    r = httpx.post(f"{env.base_a}/score", json={"text": "print(1)"}, timeout=REQUEST_TIMEOUT_S,
                   headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list(b"print(1)") and body["n_tokens"] == 8
    with torch.no_grad():
        logp = torch.log_softmax(load_model(env.ckpt_a)(torch.tensor([[0, *b"print(1)"]]))[0, :-1], dim=-1)
    ref = logp.gather(1, torch.tensor(list(b"print(1)"))[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(body["logprobs"]), ref, atol=1e-4, rtol=1e-4)
    assert body["total_logprob"] == pytest.approx(sum(body["logprobs"]))


def _stream_text(client: openai.OpenAI, seed: int) -> str:
    chunks = client.completions.create(model="alpha", prompt=f"row {seed}: ", max_tokens=24, temperature=0.9,
                                       seed=seed, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_concurrent_streams_batch_and_match_alone(env):
    """8 concurrent streams share batches (the replica's histogram shows a batch above 1 row) and
    each gives what it gives alone with the same seed."""
    client = env.client(env.base_a, KEY_A)
    alone = [_stream_text(client, seed) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda s: _stream_text(client, s), range(8)))
    assert together == alone
    stats = httpx.get(f"{env.base_a}/stats", headers={"Authorization": f"Bearer {KEY_A}"},
                      timeout=REQUEST_TIMEOUT_S).json()
    print("alpha batch sizes:", stats["batch_sizes"], "ttft p50 ms:", stats["ttft_ms_p50"])
    assert max(int(size) for size in stats["batch_sizes"]) > 1
    assert stats["ttft_ms_p50"] is not None


def test_second_deployment_and_the_cli_leave_the_first_serving(env):
    """beta was deployed after alpha; a third comes from `python -m jobs.serve` joining the cluster
    as under `ray job submit`; all answer, each only with its own key."""
    key_file = env.tmp / "gamma.key"
    key_file.write_text("key-gamma-0123456789\n")
    spec = env.tmp / "gamma.yaml"
    spec.write_text(f"name: gamma\ncheckpoint: {env.ckpt_a}\nnum_cpus: 0\nroute_prefix: /g\n"
                    f"key_sha256: {key_hash('key-gamma-0123456789')}\nlimits: {{max_tokens: 16}}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--spec", str(spec), "--key-file", str(key_file),
                           "--port", str(env.port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert proc.returncode == 0, proc.stderr
    assert "API key" not in proc.stdout  # the deployer brought the key: nothing to show
    base_g = f"http://127.0.0.1:{env.port}/g/v1"
    for base, key, name in ((env.base_a, KEY_A, "alpha"), (env.base_b, KEY_B, "beta"),
                            (base_g, "key-gamma-0123456789", "gamma")):
        out = env.client(base, key).completions.create(model=name, prompt="hi", max_tokens=4)
        assert out.model == name and out.usage.completion_tokens >= 1
    assert status("gamma").status == "RUNNING"
    serve.delete("gamma")
    assert status("gamma") is None and status("alpha").status == "RUNNING"


def test_autoscaling_adds_a_replica_under_load(env):
    """Serve's autoscaler follows the spec: one replica aims at one ongoing request, so a bounded
    load of 6 concurrent clients makes it start the second replica (max 2) with no request failing."""
    spec = ServeSpec(name="delta", checkpoint=str(env.ckpt_a), num_cpus=0, route_prefix="/d",
                     batching=BatchingConfig(max_batch_size=2, batch_wait_timeout_s=0.0, max_concurrent_batches=1),
                     autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=2, target_ongoing_requests=1.0,
                                                 upscale_delay_s=0.0, downscale_delay_s=600.0),
                     limits=LimitsConfig(max_tokens=32, default_max_tokens=8))
    base = deploy(spec, KEY_A, http_port=env.port).base_url
    assert status("delta").replicas == {"RUNNING": 1}
    stop, results = threading.Event(), []

    def load() -> None:
        client = env.client(base, KEY_A)
        for _ in range(AUTOSCALE_MAX_REQUESTS):
            if stop.is_set():
                return
            try:
                client.completions.create(model="delta", prompt="scale ", max_tokens=32, temperature=0.5)
                results.append("ok")
            except Exception as e:  # counted: the test asserts on the count
                results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        s = wait_until(lambda: (v := status("delta")).replicas.get("RUNNING", 0) >= 2 and v,
                       timeout_s=AUTOSCALE_TIMEOUT_S, interval_s=0.5, what="delta scaled to 2 running replicas")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2 * REQUEST_TIMEOUT_S)
        serve.delete("delta")
    failures = [r for r in results if r != "ok"]
    assert s.replicas.get("RUNNING") == 2, s
    assert results and not failures, failures[:3]


def _request_loop(env: Env, stop: threading.Event, results: list[str], max_requests: int) -> None:
    client = env.client(env.base_b, KEY_B)
    for _ in range(max_requests):
        if stop.is_set():
            return
        try:
            out = client.completions.create(model="beta", prompt="loop ", max_tokens=8, temperature=0.5)
            results.append("ok" if out.choices[0].finish_reason else "bad")
        except Exception as e:  # counted: the test asserts on the count
            results.append(f"{type(e).__name__}: {e}")


def test_rolling_update_drops_no_request(env):
    ckpt_c = write_checkpoint(env.tmp / "c", TINY, seed=2)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_request_loop, args=(env, stop, results, 400)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    deploy(_spec("beta", ckpt_c, 2), KEY_B, http_port=env.port)  # returns when the new version runs
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=2 * REQUEST_TIMEOUT_S)
    failures = [r for r in results if r != "ok"]
    print(f"rolling update: {len(results)} requests, {len(failures)} failed")
    assert len(results) >= 4 and not failures, failures[:3]
    stats = httpx.get(f"{env.base_b}/stats", headers={"Authorization": f"Bearer {KEY_B}"},
                      timeout=REQUEST_TIMEOUT_S).json()
    assert stats["checkpoint"] == str(ckpt_c.resolve())


def test_killed_replica_is_replaced_and_no_request_hangs(env):
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "SERVE_REPLICA::beta" in a["name"]]
    assert len(replicas) == 2
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_request_loop, args=(env, stop, results, 30)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=30 * REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)  # every request ended, none hangs
    failures = [r for r in results if r != "ok"]
    print(f"replica killed: {len(results)} requests, {len(failures)} failed: {failures[:3]}")
    assert len(results) == 90 and len(failures) <= 10  # only requests on the killed replica may fail
    s = wait_until(lambda: (v := status("beta")).replicas.get("RUNNING", 0) >= 2 and v, timeout_s=120,
                   interval_s=1.0, what="beta back at 2 running replicas")
    assert s.replicas.get("RUNNING") == 2 and s.status == "RUNNING"
