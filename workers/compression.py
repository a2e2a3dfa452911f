"""Top-k gradient sparsification with error feedback, as a DDP communication hook.

Why: cross-node (and cross-kind, gloo over host memory) gradient sync is bandwidth bound. Sending only
the k largest entries of each DDP bucket, as (index, value) pairs, cuts the bytes on the wire by about
``1 / (2 * density)``. What is not sent is kept per rank as a residual and added to the next step's
gradient (error feedback: Stich et al. 2018; Deep Gradient Compression, Lin et al. 2018), so every
gradient coordinate is applied eventually and sparse SGD converges like dense SGD.

Shape legend: ``n`` elements in a bucket, ``k`` entries selected per rank, ``N`` ranks in the group.

Dtypes on the wire: the (index, value) pairs travel as ONE float tensor of ``2k`` elements per rank,
``[indices bit-cast to float | values]``, gathered with one allgather. Float32 buckets send float32
values and int32 indices; float16/bfloat16 buckets are accumulated (gradient + residual), selected
and exchanged in float32, so the residual does not lose small updates to half-precision rounding and
the index bit-cast stays 4 bytes wide, and the averaged result is rounded once into the bucket dtype;
float64 buckets send float64 values and int64 indices.

Byte model (``wire_bytes`` and ``dense_bytes`` count bytes SENT BY THIS RANK, summed over buckets and
steps; protocol headers and the backend's choice of algorithm are not modelled):

- dense ring allreduce (reduce-scatter, then allgather; each sends ``(N-1)/N`` of the buffer):
  ``2 * (N-1) / N * n * elem_size`` with ``elem_size`` the bucket dtype's, counted as the integer
  ``2 * (N-1) * n * elem_size // N`` (exact whenever ``N`` divides it, e.g. ``N = 2``);
- ring allgather of the sparse payload: ``(N-1) * payload_bytes`` with
  ``payload_bytes = 2 * k * payload_elem_size`` (8 bytes per pair for float32);
- ``N = 1``: nothing is sent, both counters stay 0 (compression is still applied, so a
  single-process run trains exactly like one rank of a multi-process run).

``dense_bytes`` is what a dense allreduce of the same buckets sends (the baseline for the compression
ratio ``dense_bytes / wire_bytes``); ``wire_bytes`` is what the registered hook sent. For
``method: none`` both are the dense figure.

Not here yet (see DESIGN.md): sampled-threshold selection in place of an exact ``torch.topk``, momentum
correction, local clipping, density warm-up, and the per-bucket fallback to dense allreduce above a
density of about ``1 / N`` (where the allgather stops paying).
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook inspects the hook's
# annotations at runtime and rejects the string "dist.GradBucket".
import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from workers.config import Config


class CompressionConfig(Config):
    # none: dense allreduce (still byte-counted); topk: sparse (index, value) allgather.
    method: Literal["none", "topk"] = "topk"
    # Fraction of each bucket's elements sent per step.
    density: float = Field(0.01, gt=0.0, le=1.0)
    # Keep what was not sent and add it to the next step's gradient (Stich et al. 2018).
    error_feedback: bool = True


# Integer dtype of the same width as each payload dtype: indices are bit-cast into the payload so the
# pairs travel in one tensor and one collective.
INDEX_DTYPE_FOR_PAYLOAD = {torch.float32: torch.int32, torch.float64: torch.int64}
# Float32 indices are int32: a bucket must have fewer elements than this.
MAX_BUCKET_NUMEL_INT32_INDEX = 2**31 - 1
# Relative slack on density * n before rounding up, so that e.g. 0.07 * 100 = 7.000000000000001
# selects 7 entries, not 8 (float error of one multiplication is ~1e-16 relative).
DENSITY_ROUNDING_SLACK = 1e-12

# all_gather_single is the new name of all_gather_into_tensor (deprecated in torch 2.13 with a
# FutureWarning); both gather equal-sized tensors into one flat output and both work on gloo.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def num_selected(n: int, density: float) -> int:
    """k = max(1, ceil(density * n)), at most n; one entry at least so every bucket makes progress."""
    return min(n, max(1, math.ceil(density * n * (1.0 - DENSITY_ROUNDING_SLACK))))


def payload_dtype_for(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are accumulated, selected and sent in (see the module docstring)."""
    if grad_dtype == torch.float64:
        return torch.float64
    if grad_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"top-k compression supports floating-point buckets, got {grad_dtype}")


def dense_allreduce_bytes(n: int, elem_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of n elements: 2 * (N-1) / N * n * elem_size."""
    return 2 * (world_size - 1) * n * elem_size // world_size


def sparse_allgather_bytes(k: int, payload_elem_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allgather of its 2k-element (index, value) payload."""
    return (world_size - 1) * 2 * k * payload_elem_size


def compress(acc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of largest magnitude: (indices int64, values in acc's dtype).

    Exact ``torch.topk`` for now; a sampled threshold (top-k of a ~1% sample, then one pass) will
    replace it to avoid the sort-like cost on large buckets. Order of the k entries is unspecified.
    """
    _, idx = torch.topk(acc.abs(), k, sorted=False)  # (k,) int64
    vals = acc[idx]  # (k,)
    return idx, vals


def topk_with_feedback(
    grad: torch.Tensor, residual: torch.Tensor | None, k: int, error_feedback: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One error-feedback step on a flat gradient: (indices, values, new residual).

    acc = grad + residual; the top-k of acc are sent; the new residual is acc with the sent positions
    zeroed. The bookkeeping is exact, bit for bit: scatter(values at indices) + new residual ==
    grad + residual, because each element of acc lands either in the payload or in the residual,
    never rounded. Without error feedback the residual is ignored and None is returned for it.
    grad and residual must share dtype and device (the hook casts them first).
    """
    if error_feedback and residual is not None:
        acc = grad + residual  # (n,)
    else:
        acc = grad  # (n,)
    idx, vals = compress(acc, k)  # (k,), (k,)
    if not error_feedback:
        return idx, vals, None
    # acc aliases grad (e.g. the DDP bucket buffer) when there was no residual yet: do not zero it.
    new_residual = acc.clone() if acc is grad else acc  # (n,)
    new_residual.index_fill_(0, idx, 0)  # (n,) sent positions zeroed
    return idx, vals, new_residual


def pack(idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """(k,) indices and (k,) payload-dtype values -> one (2k,) payload: [indices bit-cast | values]."""
    index_dtype = INDEX_DTYPE_FOR_PAYLOAD[vals.dtype]
    return torch.cat([idx.to(index_dtype).view(vals.dtype), vals])  # (2k,)


def unpack(gathered: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * 2k,) gathered payloads -> all indices (N*k,) int64 and all values (N*k,)."""
    per_rank = gathered.view(-1, 2 * k)  # (N, 2k)
    index_dtype = INDEX_DTYPE_FOR_PAYLOAD[gathered.dtype]
    all_idx = per_rank[:, :k].contiguous().view(index_dtype).reshape(-1).long()  # (N*k,)
    all_vals = per_rank[:, k:].reshape(-1)  # (N*k,)
    return all_idx, all_vals


def decompress(all_idx: torch.Tensor, all_vals: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """Average of the N sparse contributions as a dense (n,) tensor; overlapping indices add up.

    index_add_ is deterministic on CPU (sequential); on CUDA it uses atomics, so the summation order
    of indices chosen by several ranks, and hence the last bit, may vary from run to run.
    """
    dense = torch.zeros(n, dtype=all_vals.dtype, device=all_vals.device)  # (n,)
    dense.index_add_(0, all_idx, all_vals)  # (n,) sum over ranks
    return dense.div_(world_size)  # (n,) mean over ranks


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


class CommState:
    """What the hooks keep between steps on one rank: config, group, residuals and byte counters.

    Residuals are keyed by ``bucket.index()``. DDP rebuilds its buckets after the first iteration (in
    gradient-ready order), so the bucket with a given index may then hold other parameters. A stored
    residual is therefore reused only when the bucket's layout is the same (element count, and the
    parameter names, or shapes when names are unknown, in order); otherwise that bucket's residual
    restarts from zeros and ``residual_resets`` counts it. Dropping a residual loses at most the
    not-yet-sent part of the gradients it held; applying it to the wrong parameters would be a bug.
    Residuals restored by ``load_residual_state`` carry no layout and are checked by element count only.
    """

    def __init__(
        self,
        config: CompressionConfig,
        process_group: dist.ProcessGroup | None = None,
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        self.config = config
        # None: the default (WORLD) group.
        self.process_group = process_group
        # id(parameter) -> name, to recognise a bucket's layout; None: use parameter shapes.
        self.param_names = dict(param_names) if param_names is not None else None
        self.residuals: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, tuple[object, ...]] = {}
        # Bytes sent by this rank (see the module docstring): by the hook, and by a dense allreduce.
        self.wire_bytes = 0
        self.dense_bytes = 0
        # Completed iterations (hook calls on DDP's last bucket) and hook calls over all buckets.
        self.steps = 0
        self.bucket_calls = 0
        # Residuals dropped because their bucket's layout changed.
        self.residual_resets = 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def residual_state(self) -> dict[int, torch.Tensor]:
        """Per-rank residuals, bucket index -> (n,) tensor, for a checkpoint (copies)."""
        return {index: residual.detach().clone() for index, residual in self.residuals.items()}

    def load_residual_state(self, residuals: Mapping[int, torch.Tensor]) -> None:
        """Restore residuals saved by ``residual_state``; each is moved to its bucket's device on use."""
        self.residuals = {int(index): residual.detach().clone() for index, residual in residuals.items()}
        self._layouts = {}

    def _layout(self, bucket: dist.GradBucket) -> tuple[object, ...]:
        params = bucket.parameters()
        if self.param_names is not None:
            return tuple(self.param_names.get(id(p), tuple(p.shape)) for p in params)
        return tuple(tuple(p.shape) for p in params)

    def _take_residual(
        self, bucket: dist.GradBucket, n: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """The bucket's residual, if one applies to its current layout (see the class docstring)."""
        index = bucket.index()
        layout = self._layout(bucket)
        residual = self.residuals.pop(index, None)
        known_layout = self._layouts.get(index)
        self._layouts[index] = layout
        if residual is None:
            return None
        if residual.numel() != n or (known_layout is not None and known_layout != layout):
            self.residual_resets += 1
            return None
        return residual.to(device=device, dtype=dtype)

    def _count(self, bucket: dist.GradBucket, dense: int, wire: int) -> None:
        self.dense_bytes += dense
        self.wire_bytes += wire
        self.bucket_calls += 1
        if bucket.is_last():
            self.steps += 1


def topk_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: top-k with error feedback, one async allgather of (index, value) pairs.

    DDP hands the hook the local, not yet averaged gradients; the returned future holds the bucket
    buffer overwritten with the average over ranks of each rank's sparse contribution.
    """
    buffer = bucket.buffer()  # (n,) local gradients, bucket dtype
    n = buffer.numel()
    if n > MAX_BUCKET_NUMEL_INT32_INDEX:
        raise ValueError(f"bucket of {n} elements is too large for int32 indices; lower bucket_cap_mb")
    config = state.config
    world_size = state.world_size
    payload_dtype = payload_dtype_for(buffer.dtype)
    k = num_selected(n, config.density)

    grad = buffer.to(payload_dtype)  # (n,) aliases buffer when already payload_dtype
    residual = (
        state._take_residual(bucket, n, payload_dtype, buffer.device) if config.error_feedback else None
    )
    idx, vals, new_residual = topk_with_feedback(grad, residual, k, config.error_feedback)  # (k,) (k,) (n,)
    if new_residual is not None:
        state.residuals[bucket.index()] = new_residual

    elem_size = buffer.element_size()
    payload_elem_size = torch.finfo(payload_dtype).bits // 8
    # Both formulas give 0 for a group of one.
    state._count(
        bucket,
        dense=dense_allreduce_bytes(n, elem_size, world_size),
        wire=sparse_allgather_bytes(k, payload_elem_size, world_size),
    )

    if world_size == 1:
        buffer.copy_(decompress(idx, vals, n, 1))  # (n,)
        return _completed(buffer)

    payload = pack(idx, vals)  # (2k,)
    gathered = torch.empty(world_size * 2 * k, dtype=payload_dtype, device=buffer.device)  # (N*2k,)
    work = _all_gather_single(gathered, payload, group=state.process_group, async_op=True)

    def _average(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises a failed allgather instead of averaging garbage
        all_idx, all_vals = unpack(gathered, k)  # (N*k,), (N*k,)
        buffer.copy_(decompress(all_idx, all_vals, n, world_size))  # (n,) cast to bucket dtype
        return buffer

    return work.get_future().then(_average)


def allreduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the dense averaging allreduce (DDP's default), with byte counting."""
    buffer = bucket.buffer()  # (n,)
    world_size = state.world_size
    n = buffer.numel()
    dense = dense_allreduce_bytes(n, buffer.element_size(), world_size)  # 0 for a group of one
    state._count(bucket, dense=dense, wire=dense)
    if world_size == 1:
        return _completed(buffer)
    # Divide first, as DDP does, so low-precision sums do not overflow.
    buffer.div_(world_size)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    config: CompressionConfig,
    process_group: dist.ProcessGroup | None = None,
) -> CommState:
    """Register the hook for ``config.method`` on a DDP model; the state carries the byte counters.

    process_group None means the group the DDP model was built with (the default group unless one was
    given to DDP): the hook must talk to the same ranks as DDP.
    """
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    names = {id(p): name for name, p in ddp_model.module.named_parameters()}
    state = CommState(config, process_group=process_group, param_names=names)
    hook = topk_hook if config.method == "topk" else allreduce_hook
    ddp_model.register_comm_hook(state, hook)
    return state
