"""The speed-aware split (workers/balance.py): how rows are apportioned, and that an uneven split
with token-weighted losses makes the same update as the equal split on the same global batch
(two gloo ranks running the product's training step)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.support.distributed import results_fixture, scenario_values
from workers.balance import SpeedSplit, apportion, loss_weight
from workers.compression import CompressionConfig
from workers.config import LoopConfig, ModelConfig
from workers.step import build_step

WORLD = 2
SEQ, GLOBAL_ROWS = 16, 16
# capacity_factor None and router_centering off: both are statistics of a rank's own batch, which
# an uneven split changes (the module docstring of workers/balance.py).
MODEL = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=SEQ, n_routed_experts=4, top_k=2,
                    expert_hidden=16, capacity_factor=None, router_centering=False)
LOOP = LoopConfig(steps=3, batch_size=GLOBAL_ROWS // WORLD, lr=1e-2, warmup_steps=0)
UNEVEN = [3, 13]  # rows of rank 0 and rank 1 in each global batch
GRAD_RTOL = 1e-9  # float64: the two splits differ only in summation order


def _global_batches(steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 256, (steps, GLOBAL_ROWS, SEQ + 1), generator=g)  # (steps, rows, SEQ + 1)


def _train(rank: int, rows: list[int], weighted: bool) -> dict[str, list]:
    """Three steps of the product's step on this rank's cut of fixed global batches: each step's
    synced gradients and the final parameters."""
    torch.set_default_dtype(torch.float64)
    try:
        step = build_step(MODEL, CompressionConfig(method="none"), LOOP, seed=0)
        start = sum(rows[:rank])
        weight = loss_weight(rows[rank], GLOBAL_ROWS, WORLD) if weighted else 1.0
        grads = []
        for i, x in enumerate(_global_batches(LOOP.steps)):
            step(i, x[start: start + rows[rank]], weight)
            grads.append([p.grad.clone() for p in step.model.parameters() if p.grad is not None])
        return {"grads": grads, "params": [p.detach().clone() for p in step.model.parameters()]}
    finally:
        torch.set_default_dtype(torch.float32)


def _speed_split(rank: int) -> list[list[int]]:
    """Rows after each of two measurements: rank 1 measured 3x as fast, then 7x (smoothing 0.5)."""
    split = SpeedSplit(total_rows=40, world=WORLD, rank=rank, smoothing=0.5)
    seen = [list(split.rows)]
    for fast in (3.0, 7.0):
        split.update(1.0 if rank == 0 else fast)
        seen.append(list(split.rows))
    return seen


def _collective_same_everywhere(rank: int) -> bool:
    flag = torch.tensor([float(rank)])
    dist.all_reduce(flag)
    return flag.item() == 1.0


SCENARIOS = {
    "equal": functools.partial(_train, rows=[GLOBAL_ROWS // WORLD] * WORLD, weighted=True),
    "uneven_weighted": functools.partial(_train, rows=UNEVEN, weighted=True),
    "uneven_unweighted": functools.partial(_train, rows=UNEVEN, weighted=False),
    "speed_split": _speed_split,
    "sanity": _collective_same_everywhere,
}
dist_results = results_fixture(__name__, WORLD, collective_timeout_s=60, join_timeout_s=300)


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b, strict=True))


def test_uneven_split_with_token_weighted_loss_makes_the_equal_split_update(dist_results):
    equal = scenario_values(dist_results, "equal")[0]
    uneven = scenario_values(dist_results, "uneven_weighted")[0]
    for step_equal, step_uneven in zip(equal["grads"], uneven["grads"], strict=True):
        assert _max_rel_diff(step_uneven, step_equal) < GRAD_RTOL
    assert _max_rel_diff(uneven["params"], equal["params"]) < GRAD_RTOL


def test_without_the_weight_the_uneven_split_moves_the_update(dist_results):
    """The control: DDP's plain mean over ranks over-weights the small rank's tokens."""
    equal = scenario_values(dist_results, "equal")[0]
    unweighted = scenario_values(dist_results, "uneven_unweighted")[0]
    assert _max_rel_diff(unweighted["grads"][0], equal["grads"][0]) > 1e-3


def test_speed_split_follows_smoothed_throughput_on_every_rank(dist_results):
    per_rank = scenario_values(dist_results, "speed_split")
    assert per_rank[0] == per_rank[1]  # one split everywhere
    # equal; then speeds 1:3 -> 40 rows as 10:30; then smoothed 1:5 (0.5 * 7 + 0.5 * 3) -> 7:33
    assert per_rank[0] == [[20, 20], [10, 30], [7, 33]]
    assert scenario_values(dist_results, "sanity") == [True, True]


def test_equal_shares_weigh_exactly_one():
    assert all(loss_weight(rows, rows * world, world) == 1.0 for rows in (1, 3, 16, 1000) for world in (1, 2, 3, 7))
    assert loss_weight(4, 28, 3) == pytest.approx(3 * 4 / 28)


@pytest.mark.parametrize(
    ("total", "weights", "rows"),
    [
        (24, [1, 1, 1], [8, 8, 8]),
        (21, [1, 2, 4], [3, 6, 12]),
        (48, [1, 2, 4], [7, 14, 27]),  # 6.86, 13.71, 27.43: the largest remainders get the 2 left over
        (5, [1, 1, 100], [1, 1, 3]),  # the floor lifts two ranks: the third gives the rows back
        (10, [1, 1000], [1, 9]),  # everyone keeps at least one row
        (7, [1, 1, 1], [3, 2, 2]),  # ties go to the lower rank
    ],
)
def test_apportion_is_proportional_with_a_floor_and_sums_to_the_total(total, weights, rows):
    assert apportion(total, weights) == rows
    assert sum(rows) == total


@pytest.mark.parametrize(("total", "weights"), [(2, [1, 1, 1]), (6, [1, 0, 1]), (6, [])])
def test_apportion_rejects_impossible_splits(total, weights):
    with pytest.raises(ValueError):
        apportion(total, weights)
