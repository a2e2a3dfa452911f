"""Serving benchmarks: batched vs unbatched Serve throughput at 32 concurrent clients, KV cache vs
recompute, Serve's added latency over an in-process call, int8 vs fp32 (latency and held-out loss),
time to first token. ``python -m tests.bench --sections serving``.

The model is the demo's latest checkpoint under runs/ (``make demo``) when there is one, else the
demo architecture with random weights (then the int8 loss change is not meaningful; the table says
which). Replicas and the in-process calls use 1 torch thread each; clients are threads of this
process, so on 2 cores they compete with the replicas: read the ratios.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from workers.checkpoint import FORMAT_VERSION, load_model
from workers.config import DataConfig, ModelConfig
from workers.moe.model import MoETransformer

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 32
REQUESTS_PER_CLIENT = 4
MAX_TOKENS = 32
CACHE_TOKENS = 100  # new tokens per generate() in the KV-cache comparison
LATENCY_REPS = 15
EVAL_BATCHES, EVAL_BATCH = 8, 8
GOAL_BATCHED = 3.0
GOAL_INT8_SHARE = 0.9
KEY = "bench-key-0123456789"


def write_checkpoint(path: Path, config: ModelConfig, seed: int) -> Path:
    """A checkpoint folder in the format workers/checkpoint.py saves (model.pt + meta.json with the
    model config) for a model with random weights: serving tests need a model, not a trained one."""
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(MoETransformer(config).state_dict(), path / "model.pt")
    (path / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": 0, "model": config.model_dump()}))
    return path


def _checkpoint(scratch: Path) -> tuple[Path, bool]:
    """(folder, trained?): the newest demo checkpoint, else a random-weight demo-size model."""
    found = sorted((ROOT / "runs").glob("demo-*/ray-train/step-*/meta.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent, True
    return write_checkpoint(scratch / "random", ModelConfig(max_seq_len=128), seed=0), False


def _held_out(scratch: Path, seq_len: int) -> list[torch.Tensor]:
    from workers.data import build_shards, shard_paths
    from workers.data.reader import pack_sequences

    manifest = build_shards(DataConfig(path=str(scratch / "data"), max_bytes=3_000_000, seq_len=seq_len),
                            log=lambda _: None)
    rows = pack_sequences(pq.read_table(shard_paths(manifest, "val"), columns=["tokens"]), seq_len)
    return [torch.from_numpy(rows[i * EVAL_BATCH:(i + 1) * EVAL_BATCH].astype(np.int64))
            for i in range(min(EVAL_BATCHES, len(rows) // EVAL_BATCH))]


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_call(model: MoETransformer, tokens: int = MAX_TOKENS) -> None:
    """The replica's work for one greedy request of ``tokens``, in this process."""
    from workers.serving.engine import BatchGeneration, RowRequest

    gen = BatchGeneration(model, [RowRequest((0, *b"def main():\n"), tokens, 0.0, 1.0, (), 0)])
    while not gen.done:
        gen.step()


def in_process(ckpt: Path, scratch: Path) -> dict[str, Any]:
    from workers.serving.int8 import quantize_model
    from workers.step import evaluate

    torch.set_num_threads(1)
    model = load_model(ckpt)
    prompt = torch.tensor([[0, *b"def main():\n"]])
    steps = min(CACHE_TOKENS, model.config.max_seq_len - prompt.shape[1])
    t_nc = _median_s(lambda: model.generate(prompt, steps, use_cache=False), 3)
    t_c = _median_s(lambda: model.generate(prompt, steps, use_cache=True), 3)
    fp32_s = _median_s(lambda: engine_call(model), LATENCY_REPS)
    val = _held_out(scratch, model.config.max_seq_len)
    loss_fp32 = evaluate(model, val, len(val)).loss
    q = load_model(ckpt)
    share = quantize_model(q).share
    int8_s = _median_s(lambda: engine_call(q), LATENCY_REPS)
    loss_int8 = evaluate(q, val, len(val)).loss
    return {"cache_tokens": steps, "no_cache_tok_s": steps / t_nc, "cache_tok_s": steps / t_c,
            "engine_p50_s": fp32_s, "int8_p50_s": int8_s, "int8_share": share, "eval_loss_fp32": loss_fp32,
            "eval_loss_int8": loss_int8, "eval_tokens": sum(v[:, 1:].numel() for v in val)}


def _load(client, name: str) -> tuple[int, list[float]]:
    """One client's streamed requests: (completion tokens, time to first token of each)."""
    tokens, ttft = 0, []
    for i in range(REQUESTS_PER_CLIENT):
        t0, first = time.perf_counter(), None
        for chunk in client.completions.create(model=name, prompt=f"# {i}\n", max_tokens=MAX_TOKENS, temperature=0.8,
                                               stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        ttft.append(first)
    return tokens, ttft


LEVELS = (1, 8, 32)  # concurrent streaming clients in the latency table
LEVEL_REQUESTS = 2  # streams per client at each level
PREFIX_TOKENS, PREFIX_CONTEXT = 512, 1024  # the shared prefix, and the context of the model serving it
GOAL_PREFIX = 3.0  # TTFT with reuse at least this many times lower
GOAL_ADDED_MS = 10.0  # Serve's added p50 latency over the in-process engine


def prefix_reuse(scratch: Path) -> dict[str, float]:
    """Time to first token (the prefill step, in-process, 1 thread) of a prompt that shares a
    PREFIX_TOKENS-token prefix with an earlier one, with the prefix cache and without; a
    random-weight demo-width model with a PREFIX_CONTEXT context (the demo's 128 cannot hold it)."""
    from workers.serving.engine import BatchGeneration, RowRequest
    from workers.serving.prefix import PrefixCache

    torch.set_num_threads(1)
    model = load_model(write_checkpoint(scratch / "long", ModelConfig(max_seq_len=PREFIX_CONTEXT), seed=0))
    shared = [1 + i % 200 for i in range(PREFIX_TOKENS)]
    cache = PrefixCache(2**28)
    counter = iter(range(10**6))

    def first_token(prefixes: PrefixCache | None) -> None:
        tail = [ord(c) for c in f"question {next(counter)}?"]
        BatchGeneration(model, [RowRequest((0, *shared, *tail), 1, 0.0, 1.0, (), 0)], prefixes=prefixes).step()

    off, on = _median_s(lambda: first_token(None), LATENCY_REPS), _median_s(lambda: first_token(cache), LATENCY_REPS)
    return {"prefix_ttft_off_ms": 1000 * off, "prefix_ttft_on_ms": 1000 * on, "prefix_speedup": off / on}


def _timed_stream(client, name: str, route: str, i: int) -> tuple[float, float | None]:
    """One streamed request of MAX_TOKENS on ``route``: (time to first token, time per output token
    after it), in seconds; the same tokens either way (chat renders a transcript first)."""
    t0, first, n = time.perf_counter(), None, 0
    if route == "chat":
        events = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"# {i}"}],
                                                max_tokens=MAX_TOKENS, temperature=0.8, stream=True)
        texts = (c.choices[0].delta.content for c in events if c.choices)
    else:
        events = client.completions.create(model=name, prompt=f"user: # {i}\nassistant:", max_tokens=MAX_TOKENS,
                                           temperature=0.8, stream=True)
        texts = (c.choices[0].text for c in events if c.choices)
    for text in texts:
        if text and first is None:
            first = time.perf_counter() - t0
        n += bool(text)
    end = time.perf_counter() - t0
    return first if first is not None else end, (end - first) / (n - 1) if first is not None and n > 1 else None


def latency_by_clients(client, name: str) -> dict[str, dict[str, float]]:
    """TTFT and TPOT p50/p95 (ms) per route and number of concurrent clients, each sending
    LEVEL_REQUESTS streams."""
    out = {}
    for clients in LEVELS:
        for route in ("completions", "chat"):
            with ThreadPoolExecutor(clients) as pool:
                times = [t for ts in pool.map(lambda c, r=route: [_timed_stream(client, name, r, c * 100 + k)
                                                                  for k in range(LEVEL_REQUESTS)], range(clients))
                         for t in ts]
            ttft = sorted(1000 * t for t, _ in times)
            tpot = sorted(1000 * t for _, t in times if t is not None) or [float("nan")]
            q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
            out[f"{route}@{clients}"] = {"ttft_p50": q(ttft, 0.5), "ttft_p95": q(ttft, 0.95),
                                         "tpot_p50": q(tpot, 0.5), "tpot_p95": q(tpot, 0.95)}
    return out


def added_latency(clients: dict, model: MoETransformer) -> dict[str, float]:
    """Where Serve's added latency goes, side by side and alternating (each rep times every probe
    once, so all see the same load), p50 in ms: the same greedy request over HTTP to the unbatched
    and the batched (default batch wait) deployments and in this process, with MAX_TOKENS and with
    1 token, and /v1/models (proxy, HTTP, key check and JSON, no model)."""
    def ask(name: str, tokens: int):
        return lambda: clients[name].completions.create(model=name, prompt="def main():\n", max_tokens=tokens,
                                                        temperature=0.0)
    probes = {"http": ask("unbatched", MAX_TOKENS), "http_batched": ask("batched", MAX_TOKENS),
              "local": lambda: engine_call(model), "http_1": ask("unbatched", 1), "local_1": lambda: engine_call(model, 1),
              "models": lambda: clients["unbatched"].models.list()}
    times: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(LATENCY_REPS):
        for k, probe in probes.items():
            times[k].append(_median_s(probe, 1))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def over_serve(ckpt: Path) -> dict[str, Any]:
    import openai
    import ray
    from ray import serve

    from jobs.runtime.serving import deploy
    from jobs.specs.serve import ServeSpec

    os.environ.pop("RAY_ADDRESS", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        limits = {"max_tokens": MAX_TOKENS, "max_rows_per_request": 1}
        apps = {
            "batched": ServeSpec(name="batched", checkpoint=str(ckpt), num_cpus=0, limits=limits,
                                 batching={"max_batch_size": CLIENTS, "batch_wait_timeout_s": 0.01,
                                           "max_concurrent_batches": 2}),
            "unbatched": ServeSpec(name="unbatched", checkpoint=str(ckpt), num_cpus=0, limits=limits,
                                   batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0,
                                             "max_concurrent_batches": 1}),
        }
        bases = {name: deploy(spec, KEY, http_port=port).base_url for name, spec in apps.items()}
        clients = {n: openai.OpenAI(base_url=b, api_key=KEY, max_retries=0, timeout=600) for n, b in bases.items()}
        out: dict[str, Any] = {}
        for name in ("unbatched", "batched", "unbatched", "batched"):  # twice, interleaved: the load drifts
            t0 = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                results = list(pool.map(lambda _, n=name: _load(clients[n], n), range(CLIENTS)))
            tok_s = sum(r[0] for r in results) / (time.perf_counter() - t0)
            out.setdefault(f"{name}_tok_s", []).append(tok_s)
            out[f"{name}_ttft"] = [t for r in results for t in r[1]]
        out["added"] = added_latency(clients, load_model(ckpt))
        out["latency"] = {name: latency_by_clients(clients[name], name) for name in ("batched", "unbatched")}
        stats = clients["batched"].get("/stats", cast_to=object)
        out["batch_sizes"] = stats["batch_sizes"]
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def serving_section(scratch: Path) -> dict:
    scratch.mkdir(parents=True, exist_ok=True)
    ckpt, trained = _checkpoint(scratch)
    local = {**in_process(ckpt, scratch), **prefix_reuse(scratch)}
    remote = over_serve(ckpt)
    batched, unbatched = statistics.median(remote["batched_tok_s"]), statistics.median(remote["unbatched_tok_s"])
    ratio = batched / unbatched
    ttft_b = [1000 * t for t in remote["batched_ttft"] if t is not None]
    ttft_u = [1000 * t for t in remote["unbatched_ttft"] if t is not None]
    a = remote["added"]
    added_ms, added_batched_ms = a["http"] - a["local"], a["http_batched"] - a["local"]
    per_token_ms = (a["http"] - a["local"] - (a["http_1"] - a["local_1"])) / (MAX_TOKENS - 1)
    d_loss = local["eval_loss_int8"] - local["eval_loss_fp32"]
    data = {"name": "serving", "checkpoint": str(ckpt), "trained": trained, "clients": CLIENTS,
            "batched_tok_s": batched, "unbatched_tok_s": unbatched, "batched_ratio": ratio,
            "ttft_ms_p50_batched": statistics.median(ttft_b), "ttft_ms_p50_unbatched": statistics.median(ttft_u),
            "serve_added_p50_ms": added_ms, "serve_added_batched_p50_ms": added_batched_ms, "added_ms": a,
            "serve_added_per_token_ms": per_token_ms, "batch_sizes": remote["batch_sizes"],
            "latency_ms": remote["latency"], **local}
    mark = lambda ok: "yes" if ok else "NO"  # noqa: E731
    md = [
        "## Serving (Ray Serve, OpenAI routes, KV cache, batching, int8)", "",
        f"`python -m tests.bench --sections serving`: {'the demo checkpoint' if trained else 'random weights (no demo checkpoint under runs/)'}"
        f" (`{ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt.name}`); 1 torch thread per replica and "
        f"in-process call; {CLIENTS} concurrent streaming clients x {REQUESTS_PER_CLIENT} requests of "
        f"{MAX_TOKENS} tokens; each load run twice, interleaved, median.", "",
        "| measure | value | goal |", "|---|---|---|",
        f"| batched vs unbatched throughput ({CLIENTS} clients) | {batched:.0f} vs {unbatched:.0f} tokens/s = "
        f"**{ratio:.1f}x** | >= {GOAL_BATCHED:.0f}x: {mark(ratio >= GOAL_BATCHED)} |",
        f"| batch sizes seen by the batched replica (rows: batches) | {remote['batch_sizes']} | > 1 |",
        f"| time to first token p50, batched / unbatched ({CLIENTS} clients) | {statistics.median(ttft_b):.0f} ms / "
        f"{statistics.median(ttft_u):.0f} ms | |",
        f"| KV cache vs recompute, {local['cache_tokens']} new tokens, 1 row | {local['cache_tok_s']:.0f} vs "
        f"{local['no_cache_tok_s']:.0f} tokens/s = **{local['cache_tok_s'] / local['no_cache_tok_s']:.1f}x** | faster |",
        f"| Serve's added p50 latency ({MAX_TOKENS} greedy tokens over HTTP vs the same in-process), unbatched / "
        f"batched deployment | **{added_ms:.1f}** / {added_batched_ms:.1f} ms ({a['http']:.1f} / {a['http_batched']:.1f} "
        f"vs {a['local']:.1f} ms, alternating) | <= {GOAL_ADDED_MS:.0f} ms: {mark(added_ms <= GOAL_ADDED_MS)} |",
        f"| ... of which fixed: /v1/models round trip (client, proxy, replica, key check, JSON) | {a['models']:.1f} ms | |",
        f"| ... of which fixed: a 1-token request over HTTP vs in-process | {a['http_1'] - a['local_1']:.1f} ms "
        f"({a['http_1']:.1f} vs {a['local_1']:.1f}) | |",
        f"| ... of which per token after the first (batch step hand-off, chunk) | {per_token_ms:.2f} ms | |",
        *latency_table(remote["latency"]),
        f"| prefix reuse: TTFT of a prompt sharing a {PREFIX_TOKENS}-token prefix, cache off / on (in-process) | "
        f"{local['prefix_ttft_off_ms']:.1f} / {local['prefix_ttft_on_ms']:.1f} ms = **{local['prefix_speedup']:.1f}x** | "
        f">= {GOAL_PREFIX:.0f}x: {mark(local['prefix_speedup'] >= GOAL_PREFIX)} |",
        f"| int8 share of parameters | {100 * local['int8_share']:.1f}% | >= {100 * GOAL_INT8_SHARE:.0f}%: "
        f"{mark(local['int8_share'] >= GOAL_INT8_SHARE)} |",
        f"| int8 vs fp32 latency ({MAX_TOKENS} greedy tokens, in-process) | {1000 * local['int8_p50_s']:.1f} vs "
        f"{1000 * local['engine_p50_s']:.1f} ms ({local['int8_p50_s'] / local['engine_p50_s']:.2f}x) | |",
        f"| int8 vs fp32 held-out loss ({local['eval_tokens']} tokens) | {local['eval_loss_int8']:.4f} vs "
        f"{local['eval_loss_fp32']:.4f} ({d_loss:+.4f}) | small |",
    ]
    return {"data": data, "markdown": md + ["", *levels_table(remote["latency"])]}


def latency_table(latency: dict) -> list[str]:
    """Chat vs completions overhead rows: the same tokens, one client, batched deployment."""
    one = latency["batched"]
    c, ch = one["completions@1"], one["chat@1"]
    return [f"| chat vs completions, 1 streaming client (TTFT p50 / TPOT p50) | {ch['ttft_p50']:.0f} vs "
            f"{c['ttft_p50']:.0f} ms / {ch['tpot_p50']:.1f} vs {c['tpot_p50']:.1f} ms | small |"]


def levels_table(latency: dict) -> list[str]:
    rows = ["| streaming clients | route | TTFT p50 (p95) batched | TTFT p50 (p95) unbatched | TPOT p50 (p95) batched | "
            "TPOT p50 (p95) unbatched |", "|---|---|---|---|---|---|"]
    for clients in LEVELS:
        for route in ("completions", "chat"):
            b, u = latency["batched"][f"{route}@{clients}"], latency["unbatched"][f"{route}@{clients}"]
            rows.append(f"| {clients} | {route} | {b['ttft_p50']:.0f} ({b['ttft_p95']:.0f}) ms | {u['ttft_p50']:.0f} "
                        f"({u['ttft_p95']:.0f}) ms | {b['tpot_p50']:.1f} ({b['tpot_p95']:.1f}) ms | {u['tpot_p50']:.1f} "
                        f"({u['tpot_p95']:.1f}) ms |")
    return rows
