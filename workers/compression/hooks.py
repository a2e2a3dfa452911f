"""The DDP communication hooks (top-k, dense, PowerSGD) and ``register``, which installs one.

Why hooks: DDP hands a hook each bucket's local gradients as they become ready and overlaps the
returned future with the rest of backward, so compression runs where DDP's allreduce would, for any
DDP model, with no change to the training step. ``register`` returns the ``CommState`` that carries
the byte counters (DESIGN.md, "Reading the byte counters").

Shapes: ``n`` elements in a bucket, ``k`` pairs per rank's payload, ``c <= k`` pairs selected,
``N`` ranks in the group.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook inspects the hook's
# annotations at runtime and rejects the string "dist.GradBucket".
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from workers.compression.feedback import accumulate, adam_direction, select_and_mask
from workers.compression.scaling import LossScaleGuard
from workers.compression.selection import compress, num_selected
from workers.compression.state import CommState
from workers.compression.wire import (
    MAX_BUCKET_NUMEL_INT32_INDEX,
    decompress,
    dense_allreduce_bytes,
    pack,
    payload_dtype_for,
    powersgd_wire_numels,
    sparse_allgather_bytes,
    sparse_pays,
    unpack,
    wire_value_dtype,
)
from workers.config import CompressionConfig

# PowerSGD: dense allreduce for the first steps (PyTorch requires > 1 with error feedback); kept small.
POWERSGD_START_ITER = 2
# Added to a bucket's norm before dividing by it in local clipping (an all-zero bucket stays zero).
CLIP_NORM_EPS = 1e-12

# all_gather_single is the new name of all_gather_into_tensor (deprecated in torch 2.13 with a
# FutureWarning); both gather equal-sized tensors into one flat output and both work on gloo.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _dense_average(buffer: torch.Tensor, state: CommState, divisor: float,
                   loss_scale: float | None = None) -> torch.futures.Future[torch.Tensor]:
    """Divide first, as DDP does (so low-precision sums do not overflow), then allreduce the buffer;
    with a loss scale, back into loss-scaled units (exact: a power of two)."""
    buffer.div_(divisor)
    if loss_scale is not None:
        buffer.mul_(loss_scale)
    if state.world_size == 1:
        return _completed(buffer)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _forward_result(inner: torch.futures.Future, outer: torch.futures.Future) -> None:
    """Complete ``outer`` with ``inner``'s value (or its exception) once ``inner`` is done."""
    def _done(fut: torch.futures.Future) -> None:
        try:
            outer.set_result(fut.value())
        except Exception as e:  # a failed allgather reaches DDP's wait on outer
            outer.set_exception(e)

    inner.add_done_callback(_done)


def _decided(state: CommState, bucket: dist.GradBucket, guard: LossScaleGuard) -> torch.futures.Future[torch.Tensor]:
    """A bucket of a decided step: compressed from unscaled gradients, or NaN-filled on a skip so that
    every rank's GradScaler sees the overflow (the hook's state is left untouched)."""
    if guard.skip is None:
        raise RuntimeError("a secondary state's bucket arrived before the primary (DDP) hook decided the step")
    if guard.skip:
        return _completed(bucket.buffer().fill_(math.nan))
    return _topk(state, bucket, guard.scale)


def topk_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: top-k (DGC) with error feedback, one async allgather of (index, value) pairs.

    DDP hands the hook the local, not yet averaged gradients; the returned future holds the bucket
    buffer overwritten with the average over ranks of each rank's sparse contribution (or, for a
    bucket where sparse does not pay, the dense average with the residual flushed into it).

    With fp16 loss scaling, ``guarded_topk_hook`` instead.
    """
    return _topk(state, bucket, None)


Hook = Callable[[CommState, dist.GradBucket], torch.futures.Future[torch.Tensor]]


def guarded_topk_hook(guard: LossScaleGuard, primary: bool = True) -> Hook:
    """``topk_hook`` under fp16 loss scaling (scaling.py), ``guard`` passed in: the primary hook (DDP's)
    defers its buckets until DDP's last one, where one all-reduced flag decides whether the step is
    skipped, then compresses them in DDP's order; a secondary hook (expert gradients, synced after
    backward) uses that decision."""
    def hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not primary:
            return _decided(state, bucket, guard)
        fut = guard.defer(bucket)
        if bucket.is_last():
            for deferred, deferred_fut in guard.decide():
                _forward_result(_decided(state, deferred, guard), deferred_fut)
        return fut

    hook.__name__ = hook.__qualname__ = "guarded_topk_hook"  # DDP logs the hook by name
    return hook


def _topk(state: CommState, bucket: dist.GradBucket, loss_scale: float | None) -> torch.futures.Future[torch.Tensor]:
    """``topk_hook`` on one bucket; ``loss_scale``: the buffer holds loss-scaled gradients, divided
    by it before error feedback, and the averaged result is multiplied back (scaling.py)."""
    buffer = bucket.buffer()  # (n,) local gradients, bucket dtype
    n = buffer.numel()
    if n >= MAX_BUCKET_NUMEL_INT32_INDEX:
        raise ValueError(f"bucket of {n} elements is too large for int32 indices; lower bucket_cap_mb")
    config = state.config
    world_size = state.world_size
    acc_dtype = payload_dtype_for(buffer.dtype)
    value_dtype = wire_value_dtype(acc_dtype, config.value_dtype)
    k = num_selected(n, state.density)
    elem_size = buffer.element_size()
    dense = dense_allreduce_bytes(n, elem_size, world_size)  # 0 for a group of one
    fallback = config.dense_fallback and not sparse_pays(n, k, elem_size, value_dtype.itemsize, world_size)

    grad = buffer.to(acc_dtype)  # (n,) aliases buffer when already acc_dtype (it is overwritten anyway)
    if loss_scale is not None:
        grad.div_(loss_scale)  # (n,) unscaled: residuals, moments and clipping see true gradients
    if config.clip_norm is not None:
        limit = config.clip_norm / math.sqrt(world_size)
        norm = torch.linalg.vector_norm(grad)  # ()
        grad.mul_(torch.clamp(limit / (norm + CLIP_NORM_EPS), max=1.0))  # (n,) no host sync
    flats = state._store(bucket, n, acc_dtype, buffer.device).flats if config.error_feedback else {}
    residual, velocity = flats.get("residual"), flats.get("velocity")
    if config.precondition == "adam":
        grad = adam_direction(grad, flats["exp_avg"], flats["exp_avg_sq"], state.steps + 1, config.adam_beta1,
                              config.adam_beta2, config.adam_eps)  # (n,) new tensor
    # The residual holds movement (update x lr / peak lr); what arrives is divided back by this step's
    # scale, because the optimizer multiplies it by this step's lr.
    scale = state.lr_scale if residual is not None else 1.0
    if not scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {scale}")
    acc = accumulate(grad, residual, velocity, config.momentum, scale) if residual is not None else grad  # (n,)

    if fallback:
        state._count(bucket, dense=dense, wire=dense, fallback=True)
        if acc is not buffer:
            buffer.copy_(acc)  # (n,) rounded into the bucket dtype
        if residual is not None:
            # Flushed: the residual keeps only the rounding into a half-precision bucket; the velocity
            # is not masked (every coordinate is sent, none is stale).
            if buffer.dtype == acc_dtype:
                residual.zero_()
            else:
                residual.sub_(buffer.to(acc_dtype))
        return _dense_average(buffer, state, world_size * scale, loss_scale)

    generator = state._generator(buffer.device) if config.selection == "sampled" else None
    if residual is not None:
        idx, wire = select_and_mask(acc, k, velocity=velocity, selection=config.selection,
                                    value_dtype=value_dtype, generator=generator)  # (c,), (c,)
    else:
        idx, vals = compress(acc, k, config.selection, generator)  # (c,), (c,)
        wire = vals.to(value_dtype)  # (c,) the rounding error is lost with the rest of what is unsent
    state._count(bucket, dense=dense, wire=sparse_allgather_bytes(k, value_dtype.itemsize, world_size))

    if world_size == 1:
        buffer.copy_(_arrived(decompress(idx, wire.to(acc_dtype), n, 1), scale, loss_scale))  # (n,)
        return _completed(buffer)

    payload = pack(idx, wire, k, pad_index=n)  # (k * pair bytes,) uint8
    gathered = torch.empty(world_size * payload.numel(), dtype=torch.uint8, device=buffer.device)  # (N * ...,)
    work = _all_gather_single(gathered, payload, group=state.process_group, async_op=True)

    def _average(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises a failed allgather instead of averaging garbage
        all_idx, all_vals = unpack(gathered, k, value_dtype)  # (N*k,), (N*k,)
        buffer.copy_(_arrived(decompress(all_idx, all_vals.to(acc_dtype), n, world_size), scale,
                              loss_scale))  # (n,) to bucket dtype
        return buffer

    return work.get_future().then(_average)


def _arrived(avg: torch.Tensor, lr_scale: float, loss_scale: float | None) -> torch.Tensor:
    """The averaged (n,) movement in the units the optimizer (and GradScaler) expect, in place."""
    avg.div_(lr_scale)
    return avg.mul_(loss_scale) if loss_scale is not None else avg


def allreduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the dense averaging allreduce (DDP's default), with byte counting."""
    buffer = bucket.buffer()  # (n,)
    world_size = state.world_size
    dense = dense_allreduce_bytes(buffer.numel(), buffer.element_size(), world_size)  # 0 for a group of one
    state._count(bucket, dense=dense, wire=dense)
    if world_size == 1:
        return _completed(buffer)
    return _dense_average(buffer, state, world_size)


def powersgd_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: PyTorch's ``powerSGD_hook`` on ``state.powersgd``, with byte counting.

    Error memories restored by ``import_state`` (the mean over the old ranks, by name) are flushed
    into the bucket the first time it is seen: added to this rank's gradient before PowerSGD runs,
    which is where PowerSGD adds its own error memory, so nothing of them is lost. After a resume
    that first step is a dense allreduce (PowerSGD compresses from iteration POWERSGD_START_ITER),
    so the saved error is applied whole on the first update.
    """
    if state.powersgd is None:
        raise RuntimeError("CommState.powersgd is not set; use register(..., method='powersgd')")
    buffer = bucket.buffer()  # (n,)
    params = bucket.parameters()
    names = tuple(state._name(p) for p in params)
    numels = tuple(p.numel() for p in params)
    state._psgd_layouts[bucket.index()] = (names, numels)
    pending = state._pending["residual"]
    if pending:
        for name, part in zip(names, buffer.split(numels), strict=True):
            saved = pending.pop(name, None)
            if saved is not None:
                part.add_(saved.to(part))
    world_size = state.world_size
    elem_size = buffer.element_size()
    wire = sum(dense_allreduce_bytes(m, elem_size, world_size) for m in powersgd_wire_numels(bucket, state.powersgd))
    state._count(bucket, dense=dense_allreduce_bytes(buffer.numel(), elem_size, world_size), wire=wire)
    return powerSGD_hook(state.powersgd, bucket)


def register(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    config: CompressionConfig,
    process_group: dist.ProcessGroup | None = None,
    guard: LossScaleGuard | None = None,
) -> CommState:
    """Register the hook for ``config.method`` on a DDP model; returns the state with the byte counters.

    Keep the returned ``CommState``: its ``wire_bytes`` / ``dense_bytes`` (or ``report()``) are this
    rank's bytes sent by the hook and by a dense allreduce of the same buckets, and its
    ``export_state`` / ``import_state`` checkpoint the residuals. process_group None means the group
    the DDP model was built with (the default group unless one was given to DDP): the hook must talk
    to the same ranks as DDP. The names of the module's trainable parameters are recorded here:
    checkpoints (``export_state``) are keyed by them. With ``guard`` (fp16 loss scaling, method topk
    only) the hook is ``guarded_topk_hook``, the primary over the hook's group.
    """
    if guard is not None and config.method != "topk":
        raise ValueError(f"loss scaling's guard needs compression.method 'topk', got {config.method!r}")
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    params = {name: p for name, p in ddp_model.module.named_parameters() if p.requires_grad}
    state = CommState(config, process_group=process_group, parameters=params)
    if config.method == "powersgd":
        state.powersgd = PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=config.powersgd_rank,
            start_powerSGD_iter=POWERSGD_START_ITER,
            use_error_feedback=True,
            warm_start=True,
        )
        ddp_model.register_comm_hook(state, powersgd_hook)
    elif guard is not None:
        guard.process_group = process_group
        ddp_model.register_comm_hook(state, guarded_topk_hook(guard))
    else:
        ddp_model.register_comm_hook(state, topk_hook if config.method == "topk" else allreduce_hook)
    return state
