"""Token dispatch of expert parallelism: rows travel to the rank that owns their expert and back.

``ExpertParallelExperts`` replaces a layer's ``GroupedExperts`` (workers/moe/model.py) with this
rank's slice of the experts and moves rows with ``torch.distributed.all_to_all_single`` (gloo,
nccl and hccl all implement it), so the router and everything around it stay single-process code.

EP rank r owns the global experts [r * E / P, (r + 1) * E / P). One MoE forward on one rank:

    route locally -> rows sorted by global expert (MoE)      (A, D)
    all_to_all per-expert counts                             (P * G,) -> split sizes on the host
    all_to_all rows to their owners                          (A, D) -> (R, D) grouped (peer, expert)
    regroup by local expert, run the local experts           (R, D)
    all_to_all results back (inverse splits)                 (R, D) -> (A, D) in the original order

Backward is the same two exchanges reversed (``_AllToAll``).

Shape suffixes used in names and comments:
    E  routed experts in the model (global ids)
    P  ranks in the EP group (ep size)
    G  experts owned by this rank (E / P)
    A  rows this rank routed (its kept token-expert assignments), sorted by global expert
    R  rows this rank received for its own experts, from every peer
    D  model width
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from workers.moe.model import MoETransformer


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits whose backward is the reverse all_to_all.

    Row block i of the input goes to peer i; the gradient of what peer i received comes back
    the same way, so every rank must run this backward (it does: all ranks run the same graph).
    Written here rather than taken from torch.distributed.nn so the backward is known to run
    on every backend the project uses (gloo included). Bytes sent to other ranks, both ways, are
    added to ``owner.sent_bytes``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        owner: ExpertParallelExperts,
    ) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.owner = output_splits, input_splits, owner
        out = x.new_empty((sum(output_splits), *x.shape[1:]))  # (sum(output_splits), D)
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=owner.group)
        owner._count_rows(x, input_splits)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        owner = ctx.owner
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))  # (sum(input_splits), D)
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=owner.group
        )
        owner._count_rows(grad_out, ctx.output_splits)
        return grad_in, None, None, None


def local_expert_order(counts_PG: Tensor, n_rows: int) -> Tensor:
    """Order that regroups received rows from (peer, local expert) blocks to (local expert, peer).

    The rows from each peer arrive sorted by that peer's global expert order, so the received
    buffer is blocks (p, g) in row-major order; the local experts want blocks (g, p). Returns
    order_R with ``received[order_R]`` grouped by local expert (peers in rank order inside each
    group, rows in arrival order inside a block). ``n_rows`` = counts_PG.sum(), known on the host.
    """
    flat = counts_PG.reshape(-1)  # (P * G,)
    start_PG = (torch.cumsum(flat, 0) - flat).view_as(counts_PG)  # (P, G) first received row of a block
    start_GP = start_PG.t().reshape(-1)  # (G * P,) the same blocks, in the target order
    len_GP = counts_PG.t().reshape(-1)  # (G * P,)
    target_GP = torch.cumsum(len_GP, 0) - len_GP  # (G * P,) first target row of each block
    pos_R = torch.arange(n_rows, device=counts_PG.device)  # (R,)
    offset_R = pos_R - torch.repeat_interleave(target_GP, len_GP, output_size=n_rows)  # (R,) row in block
    return torch.repeat_interleave(start_GP, len_GP, output_size=n_rows) + offset_R  # (R,)


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``GroupedExperts`` whose experts live on the ranks of an EP group.

    Same call as ``GroupedExperts.forward``: rows sorted by GLOBAL expert id and the (E,) global
    counts of this rank's rows. ``local`` holds only this rank's G = E / P experts (rows
    [ep_rank * G, (ep_rank + 1) * G) of the full stacked weights); every rank of ``group`` must
    call forward (and backward) together, layer by layer, as it does in a data-parallel step.

    After backward, ``local``'s gradients are the SUM over the EP group of each rank's loss
    gradient; ``ExpertGradSync`` turns that into the world average (see there).

    ``sent_bytes`` counts what this rank sent to OTHER ranks in its all-to-alls (counts, token
    rows and results forward, their gradients backward; rows a rank keeps for itself are free),
    so token traffic can be reported next to the gradient-sync bytes.
    """

    def __init__(self, local: nn.Module, n_global_experts: int, group: dist.ProcessGroup):
        super().__init__()
        self.local = local
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if n_global_experts % self.ep_size:
            raise ValueError(f"{n_global_experts} experts do not split over {self.ep_size} ranks")
        self.n_experts = n_global_experts  # as GroupedExperts: the count the forward expects
        self.n_local_experts = n_global_experts // self.ep_size
        local_n = getattr(local, "n_experts", self.n_local_experts)
        if local_n != self.n_local_experts:
            raise ValueError(f"local module holds {local_n} experts, expected {self.n_local_experts}")
        self.first_expert = self.ep_rank * self.n_local_experts
        self.sent_bytes = 0

    def _count_rows(self, rows: Tensor, splits: list[int]) -> None:
        per_row = math.prod(rows.shape[1:]) * rows.element_size()
        self.sent_bytes += (sum(splits) - splits[self.ep_rank]) * per_row

    def forward(self, x_AD: Tensor, num_tokens_per_expert: list[int] | Tensor) -> Tensor:
        if self.ep_size == 1:  # nothing to exchange
            return self.local(x_AD, num_tokens_per_expert)
        n_peers, n_local = self.ep_size, self.n_local_experts
        counts_E = torch.as_tensor(num_tokens_per_expert, dtype=torch.int64, device=x_AD.device)  # (E,)
        if counts_E.numel() != self.n_experts:
            raise ValueError(f"expected {self.n_experts} counts, got {counts_E.numel()}")
        recv_counts = torch.empty_like(counts_E)  # (P * G,)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)  # G counts to and from each peer
        self.sent_bytes += (n_peers - 1) * n_local * counts_E.element_size()
        send_PG = counts_E.view(n_peers, n_local)  # (P, G) what I send to peer p for its expert g
        recv_PG = recv_counts.view(n_peers, n_local)  # (P, G) what peer p sends me for my expert g
        # One host sync for every split size of this layer.
        sizes = torch.cat([send_PG.sum(1), recv_PG.sum(1)]).tolist()  # (2P,)
        input_splits, output_splits = sizes[:n_peers], sizes[n_peers:]
        n_recv = sum(output_splits)

        x_RD = _AllToAll.apply(x_AD, output_splits, input_splits, self)  # (R, D) by (peer, expert)
        order_R = local_expert_order(recv_PG, n_recv)  # (R,)
        y_RD = self.local(x_RD[order_R], recv_PG.sum(0))  # (R, D) grouped by local expert
        inverse_R = torch.empty_like(order_R)  # (R,)
        inverse_R[order_R] = torch.arange(n_recv, device=order_R.device)
        y_RD = y_RD[inverse_R]  # (R, D) back in arrival order
        return _AllToAll.apply(y_RD, input_splits, output_splits, self)  # (A, D)


def all_to_all_bytes(model: MoETransformer) -> int:
    """Bytes this rank has sent to other ranks in the EP all-to-alls, over all layers so far."""
    return sum(getattr(moe.experts, "sent_bytes", 0) for moe in model.moe_layers())
