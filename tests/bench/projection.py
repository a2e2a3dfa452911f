"""On paper: projected step time at 8, 64 and 512 workers, dense allreduce vs top-k allgather.

From a measured compute time and counted bytes, with a stated alpha-beta network model:

- compute: forward + backward of the demo model (``MoETransformer(ModelConfig())``, batch 16 x 128,
  torch on 1 thread, as each of the demo's 2 CPU workers) measured here, or passed in ``measured``;
  and a 1B-parameter dense model on one GPU per worker whose step time is STATED (FLOPs / rate);
- bytes sent per worker per step, from the byte models in ``workers/compression/wire.py``:
  dense ring allreduce ``2 (N-1)/N * n * 4``; top-k ring allgather ``(N-1) * k * 8`` (int32 index +
  float32 value), ``k = density * n``; the hook falls back to the dense allreduce per bucket when
  ``sparse_pays`` is false (about ``density * N >= 1``);
- time = compute + latency * ring steps + bytes / bandwidth, no overlap of compute and communication
  (DDP does overlap them bucket by bucket, so ``max(compute, comm)`` is shown too as the overlap bound).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from workers.compression import (
    INDEX_BYTES,
    dense_allreduce_bytes,
    num_selected,
    sparse_allgather_bytes,
    sparse_pays,
)
from workers.moe.model import ModelConfig, MoETransformer

WORKERS = (8, 64, 512)
DENSITIES = (0.01, 0.001)
ELEM = 4  # float32 gradients and values on the wire
BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb: the collectives run per bucket
# Links: (name, bandwidth in bit/s, latency per ring step in seconds). 10 Gbit/s: Ethernet with TCP
# (gloo); 100 Gbit/s: RDMA (InfiniBand / RoCE, nccl).
LINKS = (("10 Gbit/s", 10e9, 30e-6), ("100 Gbit/s", 100e9, 5e-6))
BATCH, SEQ_LEN = 16, 128
THREADS = 1
STEP_REPS = 5
# The larger model: 1B parameters, dense, one GPU per worker. Step time = 6 * params * tokens / rate
# (forward + backward of a dense transformer, attention FLOPs left out), at 40% of an H100's dense bf16
# peak (989 TFLOP/s), 8 sequences x 2048 tokens per GPU. Its gradients are float32 (DDP with fp32 grads).
BIG_PARAMS = 1_000_000_000
BIG_TOKENS = 8 * 2048
GPU_PEAK = 989e12
GPU_MFU = 0.40
BIG_STEP_S = 6 * BIG_PARAMS * BIG_TOKENS / (GPU_PEAK * GPU_MFU)


def _say(line: str) -> None:
    print(f"bench projection: {line}", flush=True)


def measure_demo() -> dict[str, Any]:
    """Median forward + backward time of the demo model on a (16, 128) batch, and its size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig()
        model = MoETransformer(cfg)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)  # (B, L + 1)
        times = []
        for rep in range(STEP_REPS + 1):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            logits = model(x[:, :-1])  # (B, L, V)
            (F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + model.aux_loss()).backward()
            if rep:  # the first run warms up
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"step_s": statistics.median(times), "n_params": n_params, "active_params": active_params(cfg, n_params),
            "threads": THREADS, "batch": [BATCH, SEQ_LEN], "source": "measured here"}


def active_params(cfg: ModelConfig, n_params: int) -> int:
    """Parameters used per token: all but the routed experts a token does not visit."""
    return n_params - cfg.n_layers * (cfg.n_routed_experts - cfg.top_k) * 3 * cfg.d_model * cfg.expert_hidden


def _pct(density: float) -> str:
    return f"{100 * density:g}%"


def comm(n: int, world: int, bandwidth: float, latency: float, density: float | None) -> dict[str, Any]:
    """Bytes one worker sends per step and the alpha-beta time, for n float32 gradient elements.

    density None: dense ring allreduce. Otherwise top-k per bucket, as the hook does: k = density * n_b,
    sparse allgather where ``sparse_pays``, else that bucket falls back to the dense allreduce.
    """
    per_bucket = BUCKET_BYTES // ELEM
    buckets = [per_bucket] * (n // per_bucket) + ([n % per_bucket] if n % per_bucket else [])
    sent = sparse_raw = steps = 0
    fallback = 0
    for nb in buckets:
        dense = dense_allreduce_bytes(nb, ELEM, world)
        if density is None:
            sent += dense
            steps += 2 * (world - 1)  # reduce-scatter + allgather
            continue
        k = num_selected(nb, density)
        sparse = sparse_allgather_bytes(k, ELEM, world)
        sparse_raw += sparse
        if sparse_pays(nb, k, ELEM, ELEM, world):
            sent += sparse
            steps += world - 1
        else:
            sent += dense
            steps += 2 * (world - 1)
            fallback += 1
    return {"bytes": sent, "sparse_bytes": sparse_raw, "ring_steps": steps, "buckets": len(buckets),
            "fallback_buckets": fallback, "latency_s": steps * latency, "transfer_s": sent * 8 / bandwidth,
            "comm_s": steps * latency + sent * 8 / bandwidth,
            # Without the fallback: every bucket by sparse allgather (what the fallback avoids).
            "sparse_only_comm_s": (len(buckets) * (world - 1) * latency + sparse_raw * 8 / bandwidth
                                   if density is not None else None)}


def project(name: str, n: int, compute_s: float) -> list[dict[str, Any]]:
    rows = []
    for link, bandwidth, latency in LINKS:
        for world in WORKERS:
            dense = comm(n, world, bandwidth, latency, None)
            row: dict[str, Any] = {"model": name, "link": link, "bandwidth_bps": bandwidth, "latency_s": latency,
                                   "workers": world, "compute_s": compute_s}
            for label, density in (("dense", None), *((f"topk {_pct(d)}", d) for d in DENSITIES)):
                c = dense if density is None else comm(n, world, bandwidth, latency, density)
                c["step_s"] = compute_s + c["comm_s"]
                c["overlap_s"] = max(compute_s, c["comm_s"])
                c["speedup"] = (compute_s + dense["comm_s"]) / c["step_s"]
                c["overlap_speedup"] = max(compute_s, dense["comm_s"]) / c["overlap_s"]
                row[label] = c
            rows.append(row)
    return rows


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.1f} ms"


def _mb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.2f} MB"


def _bytes_table(n: int) -> list[str]:
    md = ["| workers | dense allreduce | " + " | ".join(f"top-k {_pct(d)} allgather (vs dense) | pays?" for d in DENSITIES)
          + " |", "|---|---|" + "---|---|" * len(DENSITIES)]
    for world in WORKERS:
        dense = comm(n, world, 1.0, 0.0, None)["bytes"]
        cells = [f"{world}", _mb(dense)]
        for d in DENSITIES:
            c = comm(n, world, 1.0, 0.0, d)
            pays = c["fallback_buckets"] == 0
            cells.append(f"{_mb(c['sparse_bytes'])} ({c['sparse_bytes'] / dense:.2f}x)")
            cells.append("✓" if pays else f"✗ density x N = {d * world:g}: dense fallback in "
                         f"{c['fallback_buckets']}/{c['buckets']} buckets")
        md.append("| " + " | ".join(cells) + " |")
    return md


def _time_table(rows: list[dict[str, Any]]) -> list[str]:
    md = ["| link | workers | compute | dense: comm / step / overlap bound | "
          + " | ".join(f"top-k {_pct(d)}: comm / step / overlap bound | vs dense (step, overlap)" for d in DENSITIES)
          + " |", "|---|---|---|---|" + "---|---|" * len(DENSITIES)]
    for r in rows:
        d = r["dense"]
        cells = [r["link"], str(r["workers"]), _ms(r["compute_s"]),
                 f"{_ms(d['comm_s'])} / {_ms(d['step_s'])} / {_ms(d['overlap_s'])}"]
        for dens in DENSITIES:
            c = r[f"topk {_pct(dens)}"]
            cells.append(f"{_ms(c['comm_s'])} / {_ms(c['step_s'])} / {_ms(c['overlap_s'])}")
            if c["fallback_buckets"]:
                cells.append(f"= dense (fallback; sparse would take {_ms(c['sparse_only_comm_s'])}) ✗")
            else:
                mark = "✓" if c["speedup"] > 1.05 else "✗"
                cells.append(f"{c['speedup']:.2f}x, {c['overlap_speedup']:.2f}x {mark}")
        md.append("| " + " | ".join(cells) + " |")
    return md


def projection_section(measured: dict | None = None) -> dict:
    """measured: optional ``{"step_s": forward + backward seconds of the demo model on a (16, 128) batch,
    "n_params": its trainable parameters}`` taken elsewhere in the same run; measured here if absent."""
    started = time.perf_counter()
    demo = dict(measured) if measured and {"step_s", "n_params"} <= set(measured) else None
    if demo is None:
        _say("measuring the demo model's forward + backward")
        demo = measure_demo()
    else:
        demo.setdefault("source", "passed in")
        demo.setdefault("active_params", active_params(ModelConfig(), demo["n_params"]))
    _say(f"demo model: {demo['n_params'] / 1e6:.3f}M parameters, forward + backward {demo['step_s'] * 1e3:.0f} ms")
    demo_rows = project("demo", demo["n_params"], demo["step_s"])
    big_rows = project("1B", BIG_PARAMS, BIG_STEP_S)
    wall = time.perf_counter() - started

    n = demo["n_params"]
    links = ", ".join(f"{name}: {bw / 8e9:.2f} GB/s and {lat * 1e6:.0f} µs per ring step" for name, bw, lat in LINKS)
    md = ["## Projected step time at 8, 64 and 512 workers: dense vs top-k (on paper)", "",
          "`tests/bench/projection.py`. Model: step time = compute + latency x ring steps + bytes sent per worker / "
          "link bandwidth, with NO overlap of compute and communication; the overlap bound max(compute, comm) is "
          "shown beside it (DDP overlaps the sync of each bucket with the rest of the backward pass, so the truth "
          "lies between the two). Bytes per worker per step from `workers/compression/wire.py`: dense ring allreduce "
          f"2 (N-1)/N x n x {ELEM} B; top-k ring allgather (N-1) x k x {INDEX_BYTES + ELEM} B (int32 index + float32 "
          "value), k = density x n per bucket. Ring steps per bucket: 2 (N-1) for the allreduce, N-1 for the "
          f"allgather; the collectives run per DDP bucket of {BUCKET_BYTES >> 20} MiB (the latency term is paid "
          f"per bucket). Links: {links}; one worker per link, no contention, no protocol overhead, a flat ring "
          "(NCCL's trees and hierarchical rings cut the latency term at 512 workers; the bandwidth term is what a "
          "ring allreduce is bound by anyway). Not counted: the top-k selection compute (the selection section "
          "measures it as a share of the step), the optimizer step, stragglers.", "",
          "The sparse allgather grows with N while the dense allreduce does not: it only pays while about "
          "density x N < 1 (`sparse_pays`: N x k x 8 < 2 x n x 4). Where it does not, the hook all-reduces "
          "that bucket densely (residual flushed into it) and the step costs what dense costs: that is the "
          "\"= dense (fallback)\" cells, and the sparse bytes it would have sent are in the bytes tables. "
          "vs dense: dense step / top-k step (> 1: compression pays; ✓ where it saves more than 5%).", "",
          f"### Demo model: {n / 1e6:.3f}M parameters ({_mb(n * ELEM)} of float32 gradient), compute measured",
          "",
          f"Compute: forward + backward of `MoETransformer(ModelConfig())` on a ({BATCH}, {SEQ_LEN}) batch, "
          f"{_ms(demo['step_s'])} ({demo['source']}; torch on {demo.get('threads', THREADS)} thread of this "
          "shared 2-core CPU, as one of the demo's workers). Bytes per worker per step:", ""]
    md += _bytes_table(n) + ["", "Step time per worker:", ""] + _time_table(demo_rows)
    md += ["", f"### 1B-parameter dense model on GPUs ({_mb(BIG_PARAMS * ELEM)} of float32 gradient), "
           "compute stated", "",
           f"Compute (stated, not measured): 6 x {BIG_PARAMS / 1e9:.0f}e9 parameters x {BIG_TOKENS} tokens per GPU "
           f"(8 x 2048) = {6 * BIG_PARAMS * BIG_TOKENS:.2e} FLOPs per step at {GPU_MFU:.0%} of an H100's "
           f"{GPU_PEAK / 1e12:.0f} TFLOP/s dense bf16 peak = {_ms(BIG_STEP_S)} per step (the demo's CPU compute "
           f"scaled by the FLOP ratio of active parameters, {BIG_PARAMS:.0e} / {demo['active_params']:.3g} = "
           f"{BIG_PARAMS / demo['active_params']:.0f}x, would be {demo['step_s'] * BIG_PARAMS / demo['active_params']:.0f} s "
           "per step on one CPU thread, where no network matters). Gradients all-reduced in float32 as DDP does with fp32 gradients (bf16 gradients would halve "
           "the dense bytes; bf16 values would make a pair 6 B). Bytes per worker per step:", ""]
    md += _bytes_table(BIG_PARAMS) + ["", "Step time per worker:", ""] + _time_table(big_rows)

    def _best(rows: list[dict[str, Any]]) -> str:
        out = []
        for r in rows:
            wins = [(r[f"topk {_pct(d)}"]["speedup"], d) for d in DENSITIES
                    if not r[f"topk {_pct(d)}"]["fallback_buckets"]]
            best = max(wins, default=(1.0, None))
            if best[0] > 1.05:
                out.append(f"{r['link']} x {r['workers']}: top-k {_pct(best[1])} {best[0]:.2f}x")
        return "; ".join(out) or "nowhere (it saves less than 5% of the step at every size and link)"

    demo_share = max(r["dense"]["comm_s"] / r["dense"]["step_s"] for r in demo_rows)
    md += ["", "Where compression pays (no-overlap step, best density that does not fall back): demo model on "
           f"CPU compute: {_best(demo_rows)} -- its dense sync is at most {demo_share:.0%} of the step, so there is "
           f"little to win. 1B model on GPUs: {_best(big_rows)}.", "", f"Section wall time {wall:.0f} s."]
    data = {"name": "projection", "demo": demo, "big": {"params": BIG_PARAMS, "tokens": BIG_TOKENS,
                                                        "gpu_peak": GPU_PEAK, "mfu": GPU_MFU, "step_s": BIG_STEP_S},
            "links": [{"name": a, "bandwidth_bps": b, "latency_s": c} for a, b, c in LINKS],
            "bucket_bytes": BUCKET_BYTES, "rows": demo_rows + big_rows, "wall_s": wall}
    return {"data": data, "markdown": md}


if __name__ == "__main__":
    print("\n".join(projection_section()["markdown"]))
