"""``LocalSGD``: local optimizer steps, then a chunk-wise top-k + error-feedback sync of the change.

Why: a per-step gradient sync pays the link every step; here each worker takes ``local_steps``
optimizer steps on its own, and only then do the workers agree on the weights, sending the
change since the round began (the pseudo-gradient, DiLoCo) compressed with chunk-wise top-k,
low-bit values and error feedback (SparseLoCo). ``local_steps: 1`` is a per-step sync of each
step's update through the same code, so one path spans the frontier from per-step compression to
long rounds. Design and byte model: DESIGN.md, "Local steps".

Use it on any model, as a DDP hook (no DDP wrapper: nothing is synced during a round)::

    sync = LocalSGD(model, CompressionConfig(method="local", local_steps=4, density=0.03, value_bits=2,
                                             outer_lr=1.5))
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.step(tokens=len(x))  # every local_steps calls: the outer sync (a collective)
    sync.finish_round()           # before evaluating or saving: every rank holds the same weights

Shapes: ``n`` elements of the synced parameters together, ``c`` chunks, ``k`` per chunk, ``N`` ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.compression import chunks
from workers.compression.state import LOCAL_KIND
from workers.compression.wire import dense_allreduce_bytes, payload_dtype_for
from workers.config import CompressionConfig

logger = logging.getLogger(__name__)

# The per-parameter kind in export_state's "<kind>/<name>" keys (distinct from the per-step
# hooks' "residual": that one holds gradient units, this one weight units).
ERROR_KIND = LOCAL_KIND
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class LocalSGD:
    """Local steps with a compressed outer sync for the floating-point trainable ``params`` of one
    process group (the model's, or a name -> parameter mapping).

    Every rank of ``process_group`` (None: the default group) must build it at the same point and
    call ``step`` after each optimizer step: the construction broadcasts the group's first rank's
    parameters (as DDP does), which become the round's start weights. Public counters (this
    rank's): ``wire_bytes`` (sent by the outer syncs, dense warm-up included), ``dense_bytes`` (a
    dense ring allreduce of the same parameters after every step), ``steps``, ``rounds``.
    """

    def __init__(self, params: nn.Module | Mapping[str, torch.Tensor], config: CompressionConfig,
                 process_group: dist.ProcessGroup | None = None, broadcast: bool = True) -> None:
        if config.method != "local":
            raise ValueError(f"LocalSGD needs compression.method 'local', got {config.method!r}")
        named = params.named_parameters() if isinstance(params, nn.Module) else params.items()
        self.params = {name: p for name, p in named if p.requires_grad and p.is_floating_point()}
        self.config, self.process_group = config, process_group
        self.n = sum(p.numel() for p in self.params.values())
        self.chunks = chunks.chunks_for(self.n)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self._elem = max((p.element_size() for p in self.params.values()), default=4)
        if broadcast and self.world_size > 1:
            src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
            for p in self.params.values():
                dist.broadcast(p.data, src=src, group=process_group)
        # fp32 accumulators whatever the parameters' dtype (payload_dtype_for: float64 stays float64).
        dtype = payload_dtype_for(next(iter(self.params.values())).dtype) if self.params else torch.float32
        self.anchor = self._flat().to(dtype)  # (n,) the round's start weights, the same on every rank
        padded = self.chunks * chunks.CHUNK_NUMEL
        self.error = torch.zeros(padded, dtype=torch.float32, device=device)  # (c * C,) unsent change
        self.steps = self.rounds = 0
        self.round_steps, self.round_tokens = 0, 0.0
        self.wire_bytes = self.dense_bytes = 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    @property
    def warming_up(self) -> bool:
        """The next step is one of the dense warm-up's (a dense sync after every step)."""
        return self.steps < self.config.warmup_steps

    def report(self) -> dict[str, Any]:
        return {"wire_bytes": self.wire_bytes, "dense_bytes": self.dense_bytes, "steps": self.steps,
                "rounds": self.rounds, "local_steps": self.config.local_steps, "density": self.config.density}

    def _flat(self) -> torch.Tensor:
        """(n,) the parameters now, concatenated (a new tensor)."""
        if not self.params:
            return torch.zeros(0)
        return torch.cat([p.detach().reshape(-1).to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                          for p in self.params.values()])

    def _load(self, flat: torch.Tensor) -> None:
        """Copy (n,) into the parameters (rounded once into their dtype)."""
        with torch.no_grad():
            for p, part in zip(self.params.values(), flat.split([p.numel() for p in self.params.values()]),
                               strict=True):
                p.copy_(part.view_as(p))

    def step(self, tokens: float = 1.0) -> bool:
        """Count one optimizer step (``tokens``: what it trained on, the weight of this rank's change
        in the average); at the end of a round, the outer sync, a COLLECTIVE. True when it synced."""
        if not tokens > 0:
            raise ValueError(f"tokens must be > 0, got {tokens}")
        dense_step = self.warming_up
        self.steps += 1
        self.round_steps += 1
        self.round_tokens += tokens
        self.dense_bytes += dense_allreduce_bytes(self.n, self._elem, self.world_size)
        if dense_step or self.round_steps >= self.config.local_steps:
            self._sync(dense=dense_step)
            return True
        return False

    def finish_round(self) -> bool:
        """Sync now if a round is open (a COLLECTIVE; every rank is at the same step), so every rank
        holds the same weights: before evaluating, saving or stopping. True when it synced."""
        if self.round_steps == 0:
            return False
        self._sync(dense=False)
        return True

    @torch.no_grad()
    def _sync(self, dense: bool) -> None:
        cfg, world = self.config, self.world_size
        change = self.anchor - self._flat().to(self.anchor.dtype)  # (n,) the pseudo-gradient
        k = chunks.per_chunk(cfg.density)
        sparse_bytes = chunks.payload_bytes(self.chunks, k, cfg.value_bits)
        # Sparse pays while the allgather of N payloads sends less than the ring allreduce (integers).
        sparse = not dense and world * sparse_bytes < 2 * (self.n + 1) * 4
        if dense:  # warm-up: the plain weighted mean, error feedback and outer lr left out
            update, outer_lr = self._dense_mean(change.float()), 1.0
        else:
            acc = self.error
            if cfg.error_feedback:
                acc.mul_(cfg.error_decay)
            else:
                acc.zero_()
            acc[: self.n].add_(change)  # (c * C,) padding stays 0
            update = self._sparse_mean(acc, k) if sparse else self._dense_mean(acc[: self.n].clone(), flush=acc)
            outer_lr = cfg.outer_lr
        self.anchor.sub_(update[: self.n].to(self.anchor.dtype), alpha=outer_lr)
        self._load(self.anchor)
        self.rounds += 1
        self.round_steps, self.round_tokens = 0, 0.0

    def _dense_mean(self, values: torch.Tensor, flush: torch.Tensor | None = None) -> torch.Tensor:
        """The token-weighted mean over ranks of (n,) float32 values: one allreduce of
        [tokens * values, tokens]; ``flush`` (the accumulator sent whole) is zeroed."""
        buf = torch.cat([values.mul_(self.round_tokens), values.new_tensor([self.round_tokens])])  # (n + 1,)
        if self.world_size > 1:
            dist.all_reduce(buf, group=self.process_group)
            self.wire_bytes += dense_allreduce_bytes(buf.numel(), 4, self.world_size)
        if flush is not None:
            flush.zero_()
        return buf[:-1].div_(buf[-1])

    def _sparse_mean(self, acc: torch.Tensor, k: int) -> torch.Tensor:
        """Chunk-wise top-k of the accumulator, quantized; what is not sent exactly (the unselected
        entries, the rounding of the selected ones) stays in it. The token-weighted mean of every
        rank's sent part, (c * C,), the same bits on every rank."""
        bits = self.config.value_bits
        idx, vals = chunks.select(acc, k)  # (c, k), (c, k)
        codes, scale = chunks.quantize(vals, bits)
        view = acc.view(self.chunks, chunks.CHUNK_NUMEL)
        view.scatter_(1, idx, vals - chunks.dequantize(codes, scale, bits))  # (c, C) rounding error kept
        payload = chunks.pack(idx, codes, scale, self.round_tokens, bits)  # (payload bytes,) uint8
        world = self.world_size
        if world > 1:
            gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
            _all_gather_single(gathered, payload, group=self.process_group)
            self.wire_bytes += (world - 1) * payload.numel()  # ring allgather
        else:
            gathered = payload
        return chunks.weighted_average(gathered, world, self.chunks, k, bits)

    def export_state(self, process_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """The error-feedback accumulators as their MEAN over ranks, by parameter name, and ``steps``;
        a COLLECTIVE (one allreduce), every rank gets the same dict on CPU.

        Only at a round's end (``finish_round`` first): the weights are then the start weights, the
        same on every rank, so the model's own checkpoint holds them. process_group None: this
        object's group. Keys ``outer_error/<name>`` (flat) and ``steps``, as CommState's.
        """
        if self.round_steps:
            raise RuntimeError(f"export_state inside a round ({self.round_steps} local steps not synced); "
                               "call finish_round() first")
        group = process_group if process_group is not None else self.process_group
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        mean = self.error[: self.n].to(torch.float64)  # (n,)
        if world > 1:
            dist.all_reduce(mean, group=group)
        mean = mean.div_(world).float().cpu()
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        parts = mean.split([p.numel() for p in self.params.values()])
        out.update({f"{ERROR_KIND}/{name}": part.clone() for name, part in zip(self.params, parts, strict=True)})
        return out

    def import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Start from ``export_state``'s result (any old world size): every rank gets the saved mean
        accumulator, and the current parameters (just loaded from the same checkpoint, the same on
        every rank) become the start weights. Kinds another method saved (the per-step hooks'
        residuals, moments) are dropped with a warning; unknown keys and wrong sizes are errors."""
        error = torch.zeros_like(self.error)
        offsets, at = {}, 0
        for name, p in self.params.items():
            offsets[name] = (at, p.numel())
            at += p.numel()
        dropped = 0
        for key, tensor in state.items():
            kind, _, name = key.partition("/")
            if key == "steps":
                self.steps = int(tensor)
            elif kind == ERROR_KIND and name in offsets:
                start, numel = offsets[name]
                if tensor.numel() != numel:
                    raise ValueError(f"{key} has {tensor.numel()} elements, the parameter {numel}")
                error[start : start + numel] = tensor.reshape(-1).to(error)
            elif kind in ("residual", "velocity", "exp_avg", "exp_avg_sq") and name:
                dropped += 1
            else:
                raise ValueError(f"unknown compression state key {key!r}")
        if dropped:
            logger.warning("compression: %d saved per-step tensors dropped (method local keeps its own)", dropped)
        self.error = error.to(self.error.device)
        self.anchor = self._flat().to(self.anchor)
        self.round_steps, self.round_tokens = 0, 0.0
