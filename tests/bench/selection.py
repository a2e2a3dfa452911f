"""Top-k selection cost: sampled threshold vs exact torch.topk, and compression's share of a step.

Two measurements, each taken side by side in one process (ratios are the figures to quote on a
shared, noisy machine):

1. On 10M- and 100M-element float32 tensors, at densities 1% and 0.1%: the median time of
   ``sampled_topk_indices`` (the hook's default selection) and of ``torch.topk(|x|, k)`` (exact; |x| is
   part of its cost, as in the hook), run alternately; the ratio (goal <= 0.3x) and the kept count
   relative to k (goal within 10%).
2. Everything one rank computes in the top-k hook for a bucket the size of the demo model
   (``MoETransformer(ModelConfig())``), at 2 ranks without the network: accumulate the residual,
   select, mask, pack, unpack both ranks' payloads, decompress -- as a share of that model's
   forward + backward on a (16, 128) batch (goal <= 10%).

Torch runs single-threaded here, as each of the demo's 2 workers does on a 2-core machine
(``torch_threads = cpus // workers``), and so that the other side of a comparison is not starved by
oversubscribed threads.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.compression import (
    accumulate,
    decompress,
    num_selected,
    pack,
    sampled_topk_indices,
    select_and_mask,
    unpack,
)
from workers.moe.model import ModelConfig, MoETransformer

SIZES = (10_000_000, 100_000_000)
DENSITIES = (0.01, 0.001)
# Repetitions per variant (median taken); the 100M exact topk takes seconds, so fewer there.
REPS = {10_000_000: 5, 100_000_000: 3}
STEP_REPS = 5
BATCH, SEQ_LEN = 16, 128
WORLD_SIZE = 2
THREADS = 1
GOAL_RATIO = 0.3
GOAL_COUNT_TOL = 0.1
GOAL_SHARE = 0.10


def _say(line: str) -> None:
    print(f"bench selection: {line}", flush=True)


def _timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _exact(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x.abs(), k, sorted=False).values  # (k,) |x| is part of the cost, as in the hook


def _selection_rows(gen: torch.Generator) -> list[dict]:
    rows = []
    for n in SIZES:
        _say(f"{n / 1e6:.0f}M elements: generating")
        x = torch.randn(n, generator=gen)  # (n,)
        for density in DENSITIES:
            k = num_selected(n, density)
            exact_s, sampled_s, counts, kept_min_rel = [], [], [], []
            kth = None
            for rep in range(REPS[n]):
                order = ("exact", "sampled") if rep % 2 == 0 else ("sampled", "exact")
                for variant in order:
                    gc.collect()
                    if variant == "exact":
                        dt, top = _timed(_exact, x, k)  # (k,)
                        exact_s.append(dt)
                        kth = top.min().item()
                        del top
                    else:
                        dt, idx = _timed(sampled_topk_indices, x, k, gen)  # (c,)
                        sampled_s.append(dt)
                        counts.append(idx.numel())
                        kept_min_rel.append(x[idx].abs().min().item())
                        del idx
            exact_t, sampled_t = statistics.median(exact_s), statistics.median(sampled_s)
            row = {
                "n": n, "density": density, "k": k, "reps": REPS[n],
                "exact_s": exact_t, "sampled_s": sampled_t, "ratio": sampled_t / exact_t,
                "kept_min_over_k": min(counts) / k, "kept_max_over_k": max(counts) / k,
                # Smallest kept magnitude / exact k-th largest magnitude (1.0: the exact top-k).
                "kept_min_mag_over_kth": min(kept_min_rel) / kth,
            }
            rows.append(row)
            _say(f"n={n / 1e6:.0f}M density={density}: exact {exact_t * 1e3:.0f} ms, sampled "
                 f"{sampled_t * 1e3:.0f} ms, ratio {row['ratio']:.2f}, kept {min(counts)}..{max(counts)} of {k}")
        del x
        gc.collect()
    return rows


def _step_time(gen: torch.Generator) -> tuple[float, int]:
    """Median forward + backward time of the demo model on a (16, 128) batch; its parameter count."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = MoETransformer(cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randint(cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)  # (B, L + 1)
    inputs, targets = x[:, :-1], x[:, 1:]  # (B, L) each

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(inputs)  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + model.aux_loss()
        loss.backward()

    step()  # warm-up (allocator, first-call overheads)
    times = [_timed(step)[0] for _ in range(STEP_REPS)]
    return statistics.median(times), n_params


def _hook_compute(n: int, density: float, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """One rank's top-k hook work for an n-element bucket at 2 ranks, network excluded."""
    k = num_selected(n, density)
    residual = torch.randn(n, generator=gen) * 1e-3  # (n,)
    peer_idx = torch.randperm(n, generator=gen)[:k]  # (k,)
    peer = pack(peer_idx, torch.randn(k, generator=gen), k, n)  # the other rank's payload

    def run(grad: torch.Tensor) -> torch.Tensor:
        acc = accumulate(grad, residual)  # (n,)
        idx, wire = select_and_mask(acc, k, selection="sampled", generator=gen)  # (c,), (c,)
        gathered = torch.cat([pack(idx, wire, k, n), peer])  # (2 * payload,) what the allgather returns
        all_idx, all_vals = unpack(gathered, k, torch.float32)  # (2k,), (2k,)
        return decompress(all_idx, all_vals, n, WORLD_SIZE)  # (n,)

    return run


def _share_rows(gen: torch.Generator) -> list[dict]:
    _say("demo model forward + backward")
    step_s, n_params = _step_time(gen)
    rows = []
    for density in DENSITIES:
        run = _hook_compute(n_params, density, gen)
        run(torch.randn(n_params, generator=gen))  # warm-up
        times = []
        for _ in range(STEP_REPS):
            grad = torch.randn(n_params, generator=gen)  # (n,) a fresh gradient, drawn outside the timer
            times.append(_timed(run, grad)[0])
        hook = statistics.median(times)
        rows.append({"n_params": n_params, "density": density, "step_s": step_s, "hook_s": hook,
                     "share": hook / step_s})
        _say(f"{n_params / 1e6:.2f}M parameters, density {density}: hook {hook * 1e3:.1f} ms vs step "
             f"{step_s * 1e3:.0f} ms = {100 * hook / step_s:.1f}%")
    return rows


def selection_section() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    try:
        selection = _selection_rows(gen)
        share = _share_rows(gen)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started

    md = ["## Top-k selection: sampled threshold vs exact `torch.topk`", "",
          f"`tests/bench/selection.py`: float32 tensors of standard normal values, torch on {THREADS} thread; "
          "median of the runs shown, exact and sampled run alternately. Sampled: threshold from `torch.topk` on "
          "a 1% random sample (placed 3 sigma low), one chunked pass `|x| >= thr`, exact top-k among the "
          "candidates. Goals: time ratio <= "
          f"{GOAL_RATIO}x, kept count within {GOAL_COUNT_TOL:.0%} of k.", "",
          "| elements | density | k | runs | exact topk | sampled | sampled / exact | kept / k | "
          "min kept / k-th largest |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in selection:
        kept = (f"{r['kept_min_over_k']:.3f}" if r["kept_min_over_k"] == r["kept_max_over_k"]
                else f"{r['kept_min_over_k']:.3f}-{r['kept_max_over_k']:.3f}")
        md.append(f"| {r['n'] / 1e6:.0f}M | {r['density']:g} | {r['k']} | {r['reps']} | {r['exact_s'] * 1e3:.0f} ms | "
                  f"{r['sampled_s'] * 1e3:.0f} ms | {r['ratio']:.2f}x | {kept} | {r['kept_min_mag_over_kth']:.4f} |")
    md += ["", f"Compression compute per step on the demo model (`MoETransformer(ModelConfig())`, "
           f"{share[0]['n_params'] / 1e6:.2f}M parameters as one bucket): accumulate, sampled select, mask, pack, "
           f"unpack {WORLD_SIZE} payloads, decompress -- network excluded -- vs forward + backward on a "
           f"({BATCH}, {SEQ_LEN}) batch ({share[0]['step_s'] * 1e3:.0f} ms). Goal <= {GOAL_SHARE:.0%}.", "",
           "| density | hook compute | share of step compute |", "|---|---|---|"]
    for r in share:
        md.append(f"| {r['density']:g} | {r['hook_s'] * 1e3:.1f} ms | {100 * r['share']:.1f}% |")
    md += ["", f"Section wall time {wall:.0f} s."]
    data = {"name": "selection", "threads": THREADS, "selection": selection, "compute_share": share,
            "goals": {"ratio": GOAL_RATIO, "count_tolerance": GOAL_COUNT_TOL, "share": GOAL_SHARE}}
    return {"data": data, "markdown": md}


if __name__ == "__main__":
    print("\n".join(selection_section()["markdown"]))
