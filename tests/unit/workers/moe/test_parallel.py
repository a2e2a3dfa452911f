"""Tests for expert parallelism's groups and token dispatch (workers/moe/groups.py, dispatch.py) and
for the whole of it (workers/moe/parallel.py): a few training steps on 2 EP ranks track the
single-process run. Expert gradient sync is tested in test_grad_sync.py, checkpoints by global
expert id in test_checkpoint_sharding.py; the shared set-up is in tests/support/expert_parallel.py.

Shape suffixes used in names and comments:
    A  rows this rank routed to experts
    D  model width
    P  peers (ranks) in the EP group
    G  experts owned by one rank
    B  sequences in the full batch
    L  sequence length
    N  MoE layers
    E  routed experts
"""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.support.distributed import results_fixture, scenario_values
from tests.support.expert_parallel import (
    COLLECTIVE_TIMEOUT_S,
    LOSS_ATOL,
    RANKS_JOIN_TIMEOUT_S,
    WORLD_SIZE,
    collective_timeout,
    full_batch,
    half,
    lm_loss,
    models,
)
from workers.checkpoint import gather_expert_state
from workers.compression import CompressionConfig
from workers.moe.dispatch import ExpertParallelExperts, local_expert_order
from workers.moe.groups import GroupLayout
from workers.moe.model import GroupedExperts
from workers.moe.parallel import ExpertGradSync, build_groups, clip_grad_norm_, ignore_experts_in_ddp

# AdamW normalises each update by the running RMS of its gradient, so an entry whose gradient is
# ~0 can move by up to lr on one side and not the other; over a few steps the losses then drift by
# ~1e-6. The bound leaves a wide margin while a real bug (e.g. a wrong scaling) moves it by ~1e-2.
TRAIN_LOSS_ATOL = 1e-4
# Parameters after TRAIN_STEPS: each AdamW step moves an entry by about lr = 1e-2 at most, so 1e-4
# is 1% of one step; measured differences are ~1e-6.
TRAIN_STATE_ATOL = 1e-4
TRAIN_STEPS = 4
TRAIN_LR = 1e-2
# Small enough that every step is clipped (gradient norms here are ~0.5..1), so a clipping factor
# that differed between ranks would show up.
CLIP_MAX_NORM = 0.1


# ----------------------------------------------------------------------------------------------
# Single process: the pure pieces.


def test_layout_world_4_ep_2() -> None:
    layout = GroupLayout.of(4, 2)
    assert layout.ep_groups == ((0, 1), (2, 3))
    assert layout.expert_dp_groups == ((0, 2), (1, 3))
    assert [layout.ep_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [layout.expert_dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert layout.ep_group_of(3) == (2, 3) and layout.expert_dp_group_of(3) == (1, 3)


def test_layout_edge_cases() -> None:
    assert GroupLayout.of(4, 4).ep_groups == ((0, 1, 2, 3),)
    assert GroupLayout.of(4, 4).expert_dp_groups == ((0,), (1,), (2,), (3,))
    assert GroupLayout.of(4, 1).ep_groups == ((0,), (1,), (2,), (3,))
    assert GroupLayout.of(4, 1).expert_dp_groups == ((0, 1, 2, 3),)
    layout = GroupLayout.of(8, 2)
    for rank in range(8):
        # Every rank is in exactly one group of each kind, at the place its coordinates say.
        assert layout.ep_group_of(rank)[layout.ep_rank(rank)] == rank
        assert layout.expert_dp_group_of(rank)[layout.expert_dp_rank(rank)] == rank
    for world, ep in [(4, 3), (2, 0), (0, 1)]:
        with pytest.raises(ValueError):
            GroupLayout.of(world, ep)


def test_local_expert_order_regroups_blocks() -> None:
    # 2 peers, 3 local experts: received blocks (p, g) in row-major order, sizes below.
    counts_PG = torch.tensor([[2, 0, 1], [1, 3, 0]])
    labels = [(p, g) for p in range(2) for g in range(3) for _ in range(int(counts_PG[p, g]))]
    order = local_expert_order(counts_PG, len(labels))
    regrouped = [labels[i] for i in order.tolist()]
    assert regrouped == sorted(labels, key=lambda pg: (pg[1], pg[0]))
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert local_expert_order(torch.zeros(2, 3, dtype=torch.long), 0).numel() == 0


# ----------------------------------------------------------------------------------------------
# Two gloo ranks.


def _scenario_dispatch(rank: int) -> dict:
    """ExpertParallelExperts alone, crafted counts with empty experts and a rank sending nothing:
    forward and backward equal the full GroupedExperts on the same rows."""
    groups = build_groups(WORLD_SIZE, rank, 2, collective_timeout())
    torch.manual_seed(0)
    full = GroupedExperts(4, 8, 6)
    local = GroupedExperts(2, 8, 6)
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(getattr(full, name)[2 * groups.ep_rank : 2 * groups.ep_rank + 2])
    ep = ExpertParallelExperts(local, 4, groups.ep_group)
    cases = [
        ([3, 0, 2, 1], [0, 0, 0, 0]),  # rank 1 routes nothing, expert 1 gets nothing
        ([0, 0, 5, 0], [1, 4, 0, 2]),
    ]
    out = []
    for case, all_counts in enumerate(cases):
        counts = all_counts[rank]
        gen = torch.Generator().manual_seed(10 * case + rank)
        x = torch.randn(sum(counts), 8, generator=gen, requires_grad=True)  # (A, D)
        x_ref = x.detach().clone().requires_grad_(True)  # (A, D)
        weight = torch.randn(sum(counts), 8, generator=gen)  # (A, D) a fixed linear loss
        for p in (*full.parameters(), *local.parameters()):
            p.grad = None
        ep.sent_bytes = 0
        y = ep(x, torch.tensor(counts))  # (A, D)
        y_ref = full(x_ref, counts)  # (A, D)
        (y * weight).sum().backward()
        (y_ref * weight).sum().backward()
        # The owner's weight gradient sums both ranks' rows: sum the reference over ranks too.
        ref_grads = {name: p.grad.clone() for name, p in full.named_parameters()}
        for grad in ref_grads.values():
            dist.all_reduce(grad)
        lo = 2 * groups.ep_rank
        out.append(
            {
                "y": (y - y_ref).abs().max().item() if y.numel() else 0.0,
                "x_grad": (x.grad - x_ref.grad).abs().max().item() if x.numel() else 0.0,
                "w_grad": max(
                    (p.grad - ref_grads[name][lo : lo + 2]).abs().max().item()
                    for name, p in local.named_parameters()
                ),
                "rows": y.shape[0],
                "sent_bytes": ep.sent_bytes,
                # Rows to the other rank's experts and rows from it, each way twice (rows out and
                # results back, then both gradients), float32 of width 8; plus 2 int64 counts.
                "expected_bytes": 2 * 4 * 8 * (
                    sum(counts[e] for e in range(4) if e // 2 != groups.ep_rank)
                    + sum(all_counts[1 - rank][e] for e in range(4) if e // 2 == groups.ep_rank)
                )
                + 2 * 8,
            }
        )
    return {"cases": out}


def _scenario_train_ep2(rank: int) -> dict:
    """A few AdamW steps as workers/loop.py takes them (DDP for dense, ExpertGradSync, clipping,
    router-bias update from all-reduced counts) track the single-process run on the full batch.
    One fixed batch, so that the loss visibly falls in a few steps."""
    groups = build_groups(WORLD_SIZE, rank, 2, collective_timeout())
    ref, model = models(groups)
    ignore_experts_in_ddp(model)
    ddp = DDP(model, forward_sync_buffers=False)
    sync = ExpertGradSync(model, groups.expert_dp_group, CompressionConfig(method="topk", density=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=TRAIN_LR)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    x = full_batch(0)  # (B, L + 1)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss = lm_loss(ddp, half(x, rank))
        loss.backward()
        sync.sync()
        norms.append(clip_grad_norm_(model, CLIP_MAX_NORM, groups).item())
        opt.step()
        counts = model.router_counts()  # (N, 2E + 2)
        dist.all_reduce(counts)
        model.update_router_bias(counts)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD_SIZE)

        opt_ref.zero_grad()
        ref_loss = lm_loss(ref, x)
        ref_loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP_MAX_NORM).item())
        opt_ref.step()
        ref.update_router_bias(ref.router_counts())
        ref_losses.append(ref_loss.item())
    full = gather_expert_state(model, groups)
    ref_state = ref.state_dict()
    state_diff = (
        max((full[k] - ref_state[k]).abs().max().item() for k in ref_state) if full is not None else None
    )
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "norms": norms,
        "ref_norms": ref_norms,
        "state_diff": state_diff,
        "same_keys": None if full is None else sorted(full) == sorted(ref_state),
    }


SCENARIOS = {
    "dispatch": _scenario_dispatch,
    "train_ep2": _scenario_train_ep2,
}


dist_results = results_fixture(__name__, WORLD_SIZE, COLLECTIVE_TIMEOUT_S, RANKS_JOIN_TIMEOUT_S)


@pytest.mark.timeout(300)
def test_dispatch_matches_full_experts_forward_and_backward(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "dispatch")
    assert [c["rows"] for c in values[1]["cases"]] == [0, 7]
    for value in values:
        for case in value["cases"]:
            assert max(case["y"], case["x_grad"], case["w_grad"]) <= LOSS_ATOL, case
            assert case["sent_bytes"] == case["expected_bytes"], case


@pytest.mark.timeout(300)
def test_ep2_training_tracks_single_process(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "train_ep2")
    assert values[0]["losses"] == values[1]["losses"]
    value = values[0]
    for step, (loss, ref) in enumerate(zip(value["losses"], value["ref_losses"], strict=True)):
        assert abs(loss - ref) <= TRAIN_LOSS_ATOL, (step, value["losses"], value["ref_losses"])
    assert value["ref_losses"][-1] < value["ref_losses"][0]  # it trains
    # The global norm (experts summed over the EP group) is the single-process one, on both ranks.
    for v in values:
        for norm, ref in zip(v["norms"], v["ref_norms"], strict=True):
            assert abs(norm - ref) <= 1e-4 * ref and ref > CLIP_MAX_NORM, (v["norms"], v["ref_norms"])
    assert value["same_keys"] and value["state_diff"] <= TRAIN_STATE_ATOL, value["state_diff"]
    assert values[1]["state_diff"] is None  # gathered on EP rank 0 only
