"""Expert parallelism for ``MoETransformer``, applied from outside the model (torchtitan style).

The model (workers/moe/model.py) stays plain single-process PyTorch; this module is what a
training loop calls to spread its routed experts over ranks, in this order (workers/loop.py):

    groups = build_groups(world, rank, ep)           EP and expert-DP groups (workers/moe/groups.py)
    apply_expert_parallel(model, groups.ep_group)    keep this rank's experts; tokens reach them by
                                                     all-to-all (workers/moe/dispatch.py)
    ignore_experts_in_ddp(model); DDP(model)         dense parameters data-parallel over the world
    ExpertGradSync(...).sync() after backward        experts averaged over their replicas, then
    clip_grad_norm_(model, max_norm, groups)         clipped by the global norm (workers/moe/grad_sync.py)

Checkpoints gather the sharded experts back by global expert id, so a run saved with one EP size
resumes with another (``gather_expert_state`` / ``load_expert_state`` in workers/checkpoint.py).

Shape suffixes used in comments:
    E  routed experts in the model (global ids)
    G  experts owned by this rank (E / EP size)
    D  model width
    F  expert hidden width
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.moe.dispatch import ExpertParallelExperts
from workers.moe.grad_sync import ExpertGradSync, clip_grad_norm_, ignore_experts_in_ddp
from workers.moe.groups import ParallelGroups, build_groups
from workers.moe.model import GroupedExperts, MoETransformer

__all__ = [
    "ExpertGradSync",
    "ParallelGroups",
    "apply_expert_parallel",
    "build_groups",
    "clip_grad_norm_",
    "ignore_experts_in_ddp",
]


def apply_expert_parallel(model: MoETransformer, ep_group: dist.ProcessGroup) -> None:
    """Shards every MoE layer's experts over ``ep_group`` in place, keeping this rank's slice.

    Call on the fully initialised single-process model (same seed on every rank), before DDP and
    before building the optimizer: the slice is copied from the full weights, so every rank starts
    from the same global initialisation a single-process run would have, and the new parameters
    are of shape (G, ...). With a group of one the experts are wrapped too (the forward then
    calls them directly), so parameter names do not depend on the EP size.
    """
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for moe in model.moe_layers():
        full = moe.experts
        if not isinstance(full, GroupedExperts):
            raise TypeError(f"expected GroupedExperts, got {type(full).__name__} (applied twice?)")
        if full.n_experts % ep_size:
            raise ValueError(f"{full.n_experts} experts do not split over an EP group of {ep_size}")
        n_local = full.n_experts // ep_size
        lo = ep_rank * n_local
        _, d_model, hidden = full.w1.shape  # (E, D, F)
        with torch.device("meta"):  # no allocation and no random init: the values are copied below
            local = GroupedExperts(n_local, d_model, hidden)
        local = local.to_empty(device=full.w1.device).to(full.w1.dtype)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(full, name)[lo : lo + n_local])  # (G, ...) rows of my experts
        moe.experts = ExpertParallelExperts(local, full.n_experts, ep_group)
