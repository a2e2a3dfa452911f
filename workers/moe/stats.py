"""Load-balance statistics from the model's routing counts (one definition, for the training loop,
its progress lines and the benchmarks).

``MoETransformer.router_counts()`` gives per layer a row (2E + 2,): tokens per expert before
capacity dropping (E,), router logits summed over tokens (E,), dropped assignments, total
assignments. Rows may be summed over ranks or steps (counts add up).

Shape suffixes: N layers, E routed experts.
"""

from __future__ import annotations

import numpy as np
import torch


def max_vio(counts: np.ndarray | torch.Tensor) -> np.ndarray:
    """MaxVio = max load / mean load - 1 over the experts (0 is perfect balance), from counts
    (..., 2E + 2) -> (...); 0 where a row has no assignments."""
    c = counts.detach().double().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts, float)
    load = c[..., : (c.shape[-1] - 2) // 2]  # (..., E)
    mean = load.mean(axis=-1)  # (...)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, load.max(axis=-1) / mean - 1.0, 0.0)


def drop_frac(counts: np.ndarray | torch.Tensor) -> np.ndarray:
    """Dropped share of the token-expert assignments, (..., 2E + 2) -> (...); 0 with none."""
    c = counts.detach().double().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts, float)
    dropped, total = c[..., -2], c[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, dropped / total, 0.0)


def routing_stats(counts_N: torch.Tensor) -> list[dict]:
    """Per layer, from counts (N, 2E + 2): max_vio, drop_frac, and load (each expert's share of
    the assignments)."""
    c = counts_N.detach().double().cpu()  # (N, 2E + 2)
    load_NE = c[:, : (c.shape[-1] - 2) // 2]  # (N, E)
    sums = load_NE.sum(dim=-1, keepdim=True)  # (N, 1)
    shares = torch.where(sums > 0, load_NE / sums.clamp_min(1e-30), torch.zeros_like(load_NE))  # (N, E)
    return [{"max_vio": float(v), "drop_frac": float(d), "load": share.tolist()}
            for v, d, share in zip(max_vio(c), drop_frac(c), shares, strict=True)]
