"""Expert gradients: kept out of DDP, averaged over their replicas, clipped by the global norm.

Dense parameters (attention, embeddings, norms, routers, shared experts) stay data-parallel over
the whole world under DDP. The routed experts are sharded by EP (workers/moe/dispatch.py), so DDP
must not touch them (``ignore_experts_in_ddp``): ``ExpertGradSync`` averages them over the ranks
holding the same experts instead, with the same top-k + error-feedback compression as DDP's
buckets (the hooks of workers/compression, one bucket per MoE layer), after the gradient-scale
correction described in its docstring. ``clip_grad_norm_`` then clips by the norm a
single-process model would have, though each rank holds only its experts' gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from workers.compression import (
    CommState,
    CompressionConfig,
    LossScaleGuard,
    allreduce_hook,
    guarded_topk_hook,
    topk_hook,
)
from workers.moe.groups import ParallelGroups
from workers.moe.model import MoETransformer


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
    tests/unit/workers/moe/test_grad_sync.py), and is called in this one place in case it changes.
    """
    names = expert_param_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


class _LayerBucket:
    """One MoE layer's expert gradients as a flat buffer, with what the DDP comm hooks call on a
    ``dist.GradBucket`` (index, buffer, parameters, is_last): the hooks of workers/compression
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
    workers/compression, driven through the same bucket interface DDP uses, so error feedback,
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
        guard: LossScaleGuard | None = None,
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
        self.state = CommState(compression_config, process_group=expert_dp_group, parameters=named)
        self._hook = topk_hook if compression_config.method == "topk" else allreduce_hook
        if guard is not None:  # fp16: the step's skip is DDP's hook's decision; the experts count in it
            self._hook = guarded_topk_hook(guard, primary=False)
            guard.extra_params += [p for module in self.modules for p in module.parameters()]

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
