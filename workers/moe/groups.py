"""Process groups of expert parallelism: who holds which experts, and who replicates them.

Two kinds of groups partition the world. An expert-parallel (EP) group is a contiguous block of
``ep`` ranks holding one full set of routed experts between them (tokens travel inside it by
all-to-all, workers/moe/dispatch.py). An expert data-parallel group is the ranks at the same
position of every block, i.e. the replicas of the same experts (their gradients are averaged
over it, workers/moe/grad_sync.py). The layout is plain rank arithmetic (``GroupLayout``, testable
without torch.distributed); ``build_groups`` turns it into this rank's process groups.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class GroupLayout:
    """Which ranks share what, as plain rank lists (no torch.distributed; testable anywhere).

    ``ep_groups``: contiguous blocks of ``ep`` ranks; each block holds one full set of experts.
    ``expert_dp_groups``: for each EP rank i, the ranks at position i of every block, i.e. the
    replicas of the same experts. Contiguous EP blocks keep the chatty all-to-all inside a node
    when ranks are numbered node by node; the less frequent expert gradient sync crosses nodes.
    """

    world_size: int
    ep: int
    ep_groups: tuple[tuple[int, ...], ...]
    expert_dp_groups: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, world_size: int, ep: int) -> GroupLayout:
        if world_size < 1 or ep < 1 or world_size % ep:
            raise ValueError(f"ep ({ep}) must be >= 1 and divide the world size ({world_size})")
        replicas = world_size // ep
        ep_groups = tuple(tuple(b * ep + i for i in range(ep)) for b in range(replicas))
        expert_dp_groups = tuple(tuple(b * ep + i for b in range(replicas)) for i in range(ep))
        return cls(world_size, ep, ep_groups, expert_dp_groups)

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def expert_dp_rank(self, rank: int) -> int:
        return rank // self.ep

    def ep_group_of(self, rank: int) -> tuple[int, ...]:
        return self.ep_groups[self.expert_dp_rank(rank)]

    def expert_dp_group_of(self, rank: int) -> tuple[int, ...]:
        return self.expert_dp_groups[self.ep_rank(rank)]


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and its place in them (built by ``build_groups``)."""

    layout: GroupLayout
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    expert_dp_rank: int
    expert_dp_size: int


def build_groups(
    world_size: int, rank: int, ep: int, timeout: datetime.timedelta | None = None
) -> ParallelGroups:
    """Creates every EP group, then every expert-DP group, on every rank, in the same order.

    ``dist.new_group`` is collective over the whole world (each rank must create each group, even
    one it is not in), so all ranks must call this with the same arguments. New groups are made
    even when a group spans the world: the EP all-to-alls then never share a communicator with
    DDP's asynchronous bucket collectives on the default group. ``timeout`` None means
    torch's default for new groups (30 min on gloo), NOT the default group's: pass the same
    timeout as ``init_process_group`` to keep failures fast.
    """
    layout = GroupLayout.of(world_size, ep)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    ep_group = dp_group = None
    for ranks in layout.ep_groups:
        group = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            ep_group = group
    for ranks in layout.expert_dp_groups:
        group = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            dp_group = group
    assert ep_group is not None and dp_group is not None
    return ParallelGroups(
        layout=layout,
        ep_group=ep_group,
        expert_dp_group=dp_group,
        ep_rank=layout.ep_rank(rank),
        ep_size=ep,
        expert_dp_rank=layout.expert_dp_rank(rank),
        expert_dp_size=world_size // ep,
    )
