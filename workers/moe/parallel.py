"""Expert parallelism for ``MoETransformer``, applied from outside the model (torchtitan style).

The model (``workers/moe/model.py``) stays plain single-process PyTorch. This file shards its routed
experts over an expert-parallel (EP) group and moves tokens to their experts with
``torch.distributed.all_to_all_single`` (gloo, nccl and hccl all implement it):

- ``build_groups``: EP groups (contiguous blocks of ranks holding one full set of experts between
  them) and expert data-parallel groups (the ranks holding the SAME experts, one per EP group);
- ``apply_expert_parallel``: in every MoE layer, replaces ``moe.experts`` by an
  ``ExpertParallelExperts`` holding only this rank's slice of the stacked expert weights;
- ``ignore_experts_in_ddp`` / ``expert_param_names``: dense parameters (attention, embeddings,
  norms, routers, shared experts) stay data-parallel over the whole world under DDP; expert
  parameters are left out of DDP ...
- ``ExpertGradSync``: ... and averaged across their replicas with the same top-k + error-feedback
  compression as DDP's buckets (the hook of ``workers/compression.py``, driven with one bucket per
  MoE layer), after the gradient-scale correction described in its docstring;
- ``clip_grad_norm_``: the global gradient norm of a model whose experts are sharded;
- ``gather_expert_state`` / ``load_expert_state``: checkpoints by global expert id, in the format of
  a single-process model, so a run saved with one EP size resumes with another.

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

import datetime
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from workers.compression import CommState, CompressionConfig, allreduce_hook, topk_hook
from workers.moe.model import GroupedExperts, MoETransformer

# ----------------------------------------------------------------------------------------------
# Process groups


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


# ----------------------------------------------------------------------------------------------
# Token dispatch


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


def apply_expert_parallel(model: MoETransformer, ep_group: dist.ProcessGroup) -> None:
    """Shards every MoE layer's experts over ``ep_group`` in place, keeping this rank's slice.

    Call on the fully initialised single-process model (same seed on every rank), before DDP and
    before building the optimizer: the slice is copied from the full weights, so every rank starts
    from the same global initialisation a single-process run would have, and the new parameters
    are of shape (E / P, ...). With a group of one the experts are wrapped too (the forward then
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


# ----------------------------------------------------------------------------------------------
# Gradients


def _expert_modules(model: MoETransformer) -> list[nn.Module]:
    return [moe.experts for moe in model.moe_layers()]


def expert_param_names(model: MoETransformer) -> list[str]:
    """Fully qualified names (as in ``model.named_parameters()``) of the routed experts' parameters.

    For DDP's ignore list: these are sharded by EP (different on every EP rank) and synced by
    ``ExpertGradSync`` instead.
    """
    ids = {id(p) for module in _expert_modules(model) for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def ignore_experts_in_ddp(model: MoETransformer) -> list[str]:
    """Marks the expert parameters as ignored by a DDP wrapper built AFTERWARDS; returns the names.

    DDP then neither broadcasts them from rank 0 at construction (which would overwrite the
    other EP ranks' slices) nor all-reduces their gradients. Uses DDP's static
    ``_set_params_and_buffers_to_ignore_for_model``: DDP in torch 2.13 has no constructor argument
    for this; the method is underscored but documented, works there without a warning (see
    tests/test_parallel.py), and is called in this one place in case it changes.
    """
    names = expert_param_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


class _LayerBucket:
    """One MoE layer's expert gradients as a flat buffer, with what the DDP comm hooks call on a
    ``dist.GradBucket`` (index, buffer, parameters, is_last): the hooks of workers/compression.py
    then compress and average it exactly as they do DDP's buckets."""

    def __init__(self, index: int, params: list[nn.Parameter], buffer: Tensor, last: bool) -> None:
        self._index, self._params, self._buffer, self._last = index, params, buffer, last

    def index(self) -> int:
        return self._index

    def buffer(self) -> Tensor:
        return self._buffer

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def is_last(self) -> bool:
        return self._last


def _comm_state(
    config: CompressionConfig, group: dist.ProcessGroup, named_params: Mapping[str, nn.Parameter]
) -> CommState:
    """Adapter: a ``CommState`` for parameters outside any DDP model, built as ``register`` builds it.

    workers/compression.py has no public constructor for this case, and the keyword that gives the
    state its parameter names changed while this module was written (``param_names`` {id: name} ->
    ``parameters`` {name: tensor}); both spellings are handled here, in one place.
    """
    if "parameters" in inspect.signature(CommState).parameters:
        return CommState(config, process_group=group, parameters=dict(named_params))
    names = {id(p): name for name, p in named_params.items()}
    return CommState(config, process_group=group, param_names=names)  # type: ignore[call-arg]


class ExpertGradSync:
    """Averages expert gradients across their replicas (``expert_dp_group``) after backward.

    Gradient-scale rule. Each of the W = P * Q ranks (P: EP size, Q: expert-DP size) takes the
    mean loss L_r over its own batch; the single-process reference on the union of W equal
    batches has loss (1/W) sum_r L_r. DDP gives dense parameters (1/W) sum_r grad L_r. An expert
    parameter's gradient after backward is sum_{r in its EP group} grad L_r: the all-to-all
    backward brings every peer's contribution for the rows it routed there. Summing over the Q
    replicas covers all W ranks, so the reference gradient is that sum divided by W, not by Q:

        expert grad = (1 / P) * mean over expert_dp_group of (grad after backward)

    ``sync`` multiplies by 1 / P first (so error-feedback residuals live in the same units as the
    applied gradient), then averages over the group with the configured hook. The rule needs
    equal per-rank batch sizes, as DDP's average does.

    A group of one (W == P) sends nothing and counts 0 bytes; only the 1 / P scaling is applied
    (a true no-op when P == 1), and no compression, unless the hook owns optimizer state (momentum
    correction, precondition adam): then the hook still runs, at density 1, to produce the update.
    With no replica there is nothing to send, so compressing would only delay gradient mass.
    Otherwise each MoE layer is one bucket (its experts' w1, w3, w2 gradients, flat), compressed
    and averaged by ``topk_hook`` (or ``allreduce_hook`` for method "none") from
    workers/compression.py, driven through the same bucket interface DDP uses, so error feedback,
    density schedule, fallback and byte model are the DDP hook's, kept in ``self.state`` (a
    ``CommState`` of its own, whose checkpoint methods apply to the expert residuals; their
    per-name shapes depend on the EP size). PowerSGD needs DDP's own buckets: with method
    "powersgd" the experts are all-reduced densely.
    Call ``sync()`` on every rank after backward, before clipping and the optimizer step.
    """

    def __init__(
        self,
        model: MoETransformer,
        expert_dp_group: dist.ProcessGroup,
        compression_config: CompressionConfig,
    ) -> None:
        self.modules = _expert_modules(model)
        expert_ids = {id(p) for module in self.modules for p in module.parameters()}
        named = {name: p for name, p in model.named_parameters() if id(p) in expert_ids}
        self.group_size = dist.get_world_size(expert_dp_group)
        # With momentum correction or precondition adam the hook owns the optimizer state and the
        # optimizer only applies what arrives: even with no replica to send to, the hook must turn
        # the gradient into that update. Nothing is sent, so nothing needs sparsifying: density 1.
        self.hook_owns_state = compression_config.hook_owns_optimizer_state
        if self.group_size == 1 and self.hook_owns_state:
            compression_config = compression_config.model_copy(update={"density": 1.0, "warmup_steps": 0})
        self.state = _comm_state(compression_config, expert_dp_group, named)
        self._hook = topk_hook if compression_config.method == "topk" else allreduce_hook

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sent syncing expert gradients (the compression byte model)."""
        return self.state.wire_bytes

    @property
    def dense_bytes(self) -> int:
        """What a dense allreduce of the same gradients would have sent."""
        return self.state.dense_bytes

    @staticmethod
    def _grads(module: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
        pairs = []
        for p in module.parameters():
            if p.grad is None:  # every rank must still take part in the collective
                p.grad = torch.zeros_like(p)
            pairs.append((p, p.grad))
        return pairs

    @torch.no_grad()
    def sync(self) -> None:
        pending = []
        for index, module in enumerate(self.modules):
            scale = 1.0 / getattr(module, "ep_size", 1)
            pairs = self._grads(module)
            if self.group_size == 1 and not self.hook_owns_state:
                if scale != 1.0:
                    for _, grad in pairs:
                        grad.mul_(scale)
                continue
            flat = torch.cat([grad.reshape(-1) for _, grad in pairs]).mul_(scale)  # (n,)
            bucket = _LayerBucket(index, [p for p, _ in pairs], flat, last=index == len(self.modules) - 1)
            pending.append((self._hook(self.state, bucket), pairs))  # every layer in flight at once
        for future, pairs in pending:
            flat = future.wait()  # (n,) averaged over the group
            for (_, grad), part in zip(pairs, flat.split([g.numel() for _, g in pairs]), strict=True):
                grad.copy_(part.view_as(grad))


def clip_grad_norm_(model: MoETransformer, max_norm: float, groups: ParallelGroups) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model with sharded experts; returns the total norm.

    Each rank holds only its experts' gradients, so a local norm would differ from rank to rank
    and so would the clipping factor, and the dense replicas would drift apart. The squared norm
    of the experts is summed over the EP group (each expert counted once; the replicas in other
    EP groups agree after ``ExpertGradSync``) and added to the dense one, identical on every rank
    after DDP. Call after ``ExpertGradSync.sync``.
    """
    expert_ids = {id(p) for module in _expert_modules(model) for p in module.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in expert_ids]
    experts = [p.grad for p in params if id(p) in expert_ids]
    device = params[0].grad.device
    dense_norm = torch.nn.utils.get_total_norm(dense).to(device) if dense else torch.zeros((), device=device)
    expert_sq = (
        torch.nn.utils.get_total_norm(experts).to(device) ** 2 if experts else torch.zeros((), device=device)
    ).float()
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = (dense_norm.float() ** 2 + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------------------------
# Checkpoints by global expert id


def _sharded_keys(model: MoETransformer) -> dict[str, tuple[str, ExpertParallelExperts]]:
    """EP state-dict key -> (key in a single-process state dict, its EP module)."""
    keys = {}
    for path, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, _ in module.local.named_parameters():
                keys[f"{path}.local.{name}"] = (f"{path}.{name}", module)
    return keys


def gather_expert_state(
    model: MoETransformer, groups: ParallelGroups, state: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor] | None:
    """The full single-process state dict, experts concatenated back to (E, ...) by global id.

    ``state`` (default: the model's state dict) may be any dict keyed like the EP model's state
    dict, e.g. one optimizer moment or error-feedback residual per parameter: its expert entries
    are gathered the same way, so optimizer and compression state are saved by global id too.

    Collective over the EP group (every rank calls it); returned on EP rank 0 of each EP group,
    None elsewhere. World rank 0 is EP rank 0 of the first group: save what it gets. The result
    loads into a plain ``MoETransformer`` with ``load_state_dict``, or into an EP model of any EP
    size with ``load_expert_state``.
    """
    sharded = _sharded_keys(model)
    root = groups.ep_rank == 0
    out: dict[str, Tensor] = {}
    for key, value in (model.state_dict() if state is None else state).items():
        if key not in sharded:
            out[key] = value
            continue
        full_key, module = sharded[key]
        if module.ep_size != groups.ep_size:
            raise ValueError(f"{key} is sharded over {module.ep_size} ranks, groups say {groups.ep_size}")
        if groups.ep_size == 1:
            out[full_key] = value
            continue
        value = value.contiguous()  # (G, ...)
        parts = [torch.empty_like(value) for _ in range(groups.ep_size)] if root else None
        dist.gather(value, parts, group=groups.ep_group, group_dst=0)
        if root:
            out[full_key] = torch.cat(parts, dim=0)  # (E, ...)
    return out if root else None


def shard_expert_state(
    model: MoETransformer, full_state_dict: Mapping[str, Tensor], groups: ParallelGroups
) -> dict[str, Tensor]:
    """The inverse of ``gather_expert_state``: a FULL (single-process keyed) dict -> this rank's
    EP-keyed dict, expert entries cut to rows [ep_rank * G, (ep_rank + 1) * G). No communication."""
    sharded = _sharded_keys(model)
    by_full_key = {full_key: (key, module) for key, (full_key, module) in sharded.items()}
    local: dict[str, Tensor] = {}
    for full_key, value in full_state_dict.items():
        if full_key not in by_full_key:
            local[full_key] = value
            continue
        key, module = by_full_key[full_key]
        if module.ep_rank != groups.ep_rank or module.ep_size != groups.ep_size:
            raise ValueError(f"{key} was sharded for another EP layout than {groups}")
        if value.shape[0] != module.n_experts:
            raise ValueError(f"{full_key} has {value.shape[0]} experts, the model {module.n_experts}")
        lo = module.first_expert
        local[key] = value[lo : lo + module.n_local_experts]  # (G, ...)
    return local


def load_expert_state(
    model: MoETransformer, full_state_dict: Mapping[str, Tensor], groups: ParallelGroups
) -> None:
    """Loads a FULL (single-process format) state dict into an EP model: this rank's expert rows
    and every dense tensor, strictly (unknown or missing keys raise). No communication: every rank
    reads the same full checkpoint, whatever EP size wrote it.
    """
    model.load_state_dict(shard_expert_state(model, full_state_dict, groups), strict=True)
