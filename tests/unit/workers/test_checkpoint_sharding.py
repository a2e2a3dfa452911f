"""Tests for checkpoints by global expert id (workers/checkpoint.py: ``gather_expert_state``,
``load_expert_state``) on 2 gloo ranks: what an EP model gathers is the single-process state dict,
and such a dict loads into an EP 2 model, a plain model and an EP 1 model (1 -> 2 and 2 -> 1) that
then compute what the single-process model does. The shared set-up is in tests/support/expert_parallel.py.
"""

import pytest
import torch
import torch.distributed as dist

from tests.support.distributed import results_fixture, scenario_values
from tests.support.expert_parallel import (
    COLLECTIVE_TIMEOUT_S,
    LOSS_ATOL,
    RANKS_JOIN_TIMEOUT_S,
    WORLD_SIZE,
    collective_timeout,
    full_batch,
    models,
    tiny_config,
)
from workers.checkpoint import gather_expert_state, load_expert_state
from workers.moe.groups import build_groups
from workers.moe.model import MoETransformer


def _states_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _scenario_checkpoint(rank: int) -> dict:
    """Gather after identical init == single-process state dict; full dicts load into EP 2 and
    EP 1 models (1 -> 2 and 2 -> 1) and gather back unchanged."""
    groups2 = build_groups(WORLD_SIZE, rank, 2, collective_timeout())
    groups1 = build_groups(WORLD_SIZE, rank, 1, collective_timeout())
    ref, ep2 = models(groups2)
    gathered = gather_expert_state(ep2, groups2)
    out: dict = {"is_root": gathered is not None}
    if gathered is not None:
        out["init_equal"] = _states_equal(gathered, ref.state_dict())

    # 1 -> 2: a single-process checkpoint (other weights) into the EP = 2 model.
    torch.manual_seed(1)
    single = MoETransformer(tiny_config())
    for moe in single.moe_layers():  # non-zero biases, so the buffers are checked as well
        moe.router.expert_bias.normal_()
    saved = single.state_dict()
    load_expert_state(ep2, saved, groups2)
    lo = 2 * groups2.ep_rank
    out["slices_loaded"] = all(
        torch.equal(p, saved[n.replace(".local.", ".")][lo : lo + 2])
        for n, p in ep2.named_parameters()
        if ".local." in n
    )
    regathered = gather_expert_state(ep2, groups2)
    if regathered is not None:
        out["regathered_equal"] = _states_equal(regathered, saved)

    # 2 -> 1: what EP = 2 saved, into a plain model and into an EP = 1 model (2 expert replicas).
    box = [regathered]
    dist.broadcast_object_list(box, src=0)  # world rank 0 is EP rank 0 of the first EP group
    plain = MoETransformer(tiny_config())
    plain.load_state_dict(box[0])
    out["plain_equal"] = _states_equal(plain.state_dict(), saved)
    _, ep1 = models(groups1, seed=2)
    load_expert_state(ep1, box[0], groups1)
    out["ep1_equal"] = _states_equal(gather_expert_state(ep1, groups1), saved)
    # The loaded EP = 1 model computes what the single-process one does.
    x = full_batch(7)
    with torch.no_grad():
        out["ep1_logits_diff"] = (ep1(x) - single(x)).abs().max().item()
        out["ep2_logits_diff"] = (ep2(x) - single(x)).abs().max().item()

    # A checkpoint with another expert count is refused, not silently sliced.
    bad = dict(saved)
    bad["layers.0.moe.experts.w1"] = torch.zeros(6, 16, 8)
    try:
        load_expert_state(ep2, bad, groups2)
        out["bad_refused"] = False
    except ValueError:
        out["bad_refused"] = True
    return out


SCENARIOS = {"checkpoint": _scenario_checkpoint}


dist_results = results_fixture(__name__, WORLD_SIZE, COLLECTIVE_TIMEOUT_S, RANKS_JOIN_TIMEOUT_S)


@pytest.mark.timeout(300)
def test_checkpoint_by_global_expert_id(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "checkpoint")
    assert [v["is_root"] for v in values] == [True, False]
    assert values[0]["init_equal"]
    assert values[0]["regathered_equal"]
    for value in values:
        assert value["slices_loaded"]
        assert value["plain_equal"]
        assert value["ep1_equal"]
        assert value["ep1_logits_diff"] <= LOSS_ATOL and value["ep2_logits_diff"] <= LOSS_ATOL
        assert value["bad_refused"]
