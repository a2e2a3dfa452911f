"""One training step and one evaluation: the product's, called by the Ray loop, the golden run and
the benchmarks, so the golden curves and the benchmark figures guard the code that trains jobs.

``build_step`` assembles what a step touches on one rank (model, DDP and the compression hook,
expert-parallel groups and expert gradient sync, optimizer); ``TrainStep.__call__`` is the step:
learning-rate schedule, forward, LM loss + auxiliary loss, backward (the hook syncs dense gradients
bucket by bucket), expert gradient sync, clipping, optimizer, router-bias update from the
all-reduced routing counts. With ``compression.method: local`` there is no DDP and no expert
gradient sync: each rank steps on its own and ``LocalSGD`` syncs the weights every
``local_steps`` steps (workers/compression/DESIGN.md, "Local steps"). It runs the same inside a process group (Ray Train, the golden run's
gloo ranks) and in one plain process (the MoE benchmark: no DDP, no collectives).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workers import compression
from workers.compression import CommState, CompressionConfig, LocalSGD
from workers.config import LoopConfig
from workers.device import autocast, grad_scaler
from workers.moe import parallel
from workers.moe.grad_sync import expert_param_names
from workers.moe.model import ModelConfig, MoETransformer

# Collective timeout of the expert-parallel groups (torch's default for new groups is 30 minutes).
EP_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def final_window(steps: int) -> int:
    """Steps averaged into final_loss: the last 10% of the run, at least 1 and at most 50."""
    return max(1, min(50, steps // 10))


def build_optimizer(model: nn.Module, cfg: LoopConfig, comp: CompressionConfig) -> torch.optim.Optimizer:
    """AdamW; plain SGD when the hook keeps the optimizer state and sends the update direction."""
    # Matrices decay; norms and other vectors do not (the usual GPT recipe).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if comp.hook_owns_optimizer_state:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class StepResult:
    loss: torch.Tensor  # () this rank's LM loss, detached
    counts: torch.Tensor  # (layers, 2 * experts + 2) routing counts, summed over ranks


@dataclass
class TrainStep:
    """What one optimizer step touches on this rank; call it with (step, batch)."""

    model: MoETransformer  # the plain model: aux loss, routing counts, router biases
    forward: nn.Module  # what a batch goes through: DDP around the model, or the model itself
    optimizer: torch.optim.Optimizer
    loop: LoopConfig
    compression: CompressionConfig
    comm: CommState | None = None  # the DDP hook's state (byte counters, residuals)
    esync: parallel.ExpertGradSync | None = None  # expert gradients over their replicas (EP > 1)
    groups: parallel.ParallelGroups | None = None
    # fp16: dynamic loss scaling, built from loop.precision when not given; the top-k hook's side
    # of it (unscaled residuals, agreed skips) is the guard, built by build_step.
    scaler: torch.amp.GradScaler | None = None
    guard: compression.LossScaleGuard | None = None
    # method local: the outer syncs, of the dense parameters over the world and (EP > 1) of the
    # experts over their replicas; no DDP and no ExpertGradSync then (workers/compression/local.py).
    outer: LocalSGD | None = None
    outer_experts: LocalSGD | None = None

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = grad_scaler(self.loop.precision, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def clip(self) -> float | None:
        """The global-norm clip, unless the hook clips locally or sends a ready update."""
        if self.compression.hook_owns_optimizer_state or self.compression.clip_norm:
            return None
        return self.loop.grad_clip

    def byte_counts(self) -> tuple[int, int]:
        """(wire, dense-equivalent) bytes this rank's hooks (or outer syncs) have sent so far."""
        parts = [p for p in (self.comm, self.esync, self.outer, self.outer_experts) if p is not None]
        return sum(p.wire_bytes for p in parts), sum(p.dense_bytes for p in parts)

    def finish_round(self) -> None:
        """method local: sync now if a round is open (a collective), so every replica holds the same
        weights; call before evaluating or checkpointing. No-op for the per-step methods."""
        for outer in (self.outer, self.outer_experts):
            if outer is not None:
                outer.finish_round()

    def checkpoint_state(self) -> tuple[Any, Any]:
        """What workers/checkpoint.py saves and loads as the compression state: (the dense part with
        ``export_state`` / ``import_state``, the expert part as ``.state`` or None). method local:
        the outer syncs' accumulators; otherwise the DDP hook's and ExpertGradSync's."""
        if self.outer is None:
            return self.comm, self.esync
        return self.outer, (_ExpertPart(self.outer_experts) if self.outer_experts is not None else None)

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.loop)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.compression.hook_owns_optimizer_state:  # the hook weights error feedback by the schedule
            for state in (self.comm, self.esync.state if self.esync else None):
                if state is not None:
                    state.lr_scale = lr / self.loop.lr
        return lr

    def _backward(self, objective: torch.Tensor) -> None:
        """Backward, with fp16 the loss scaled first. An overflow on one rank reaches every rank's
        GradScaler: a dense allreduce carries the inf, the top-k hook's guard NaN-fills the step's
        buckets on every rank (workers/compression/scaling.py)."""
        if self.scaler is None:
            objective.backward()
            return
        if self.guard is not None:
            self.guard.begin_step(self.scaler.get_scale())
        self.scaler.scale(objective).backward()

    def __call__(self, step: int, x: torch.Tensor, loss_weight: float = 1.0) -> StepResult:
        """One optimizer step on a batch x (batch, seq_len + 1) of token ids.

        ``loss_weight`` scales this rank's LM loss before backward, so that DDP's mean over ranks is
        the global batch's mean when ranks hold different numbers of tokens (workers/balance.py)."""
        self.set_lr(step)
        if self.outer is not None:
            loss_weight = 1.0  # local steps: each rank's own mean; the outer sync weights by tokens
        inputs, targets = x[:, :-1], x[:, 1:]  # (batch, seq_len) each
        with autocast(self.loop.precision, self.device):  # fp32: no-op; master weights stay fp32
            logits = self.forward(inputs)  # (batch, seq_len, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # fp32 under autocast too
        self.optimizer.zero_grad(set_to_none=True)
        objective = loss * loss_weight if loss_weight != 1.0 else loss
        self._backward(objective + self.model.aux_loss())  # the comm hook syncs dense gradients bucket by bucket here
        if self.esync is not None:
            self.esync.sync()  # expert gradients, over the replicas of each expert
        elif self.outer is not None and self.groups is not None:
            _scale_expert_grads(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients for clipping; records an inf/NaN
        clip = self.clip
        if clip and self.groups is not None:
            parallel.clip_grad_norm_(self.model, clip, self.groups)  # the global norm, experts sharded
        elif clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN (on any rank: see _backward)
            self.scaler.update()  # halves the scale after a skip
        else:
            self.optimizer.step()
        counts = self.model.router_counts()  # (layers, 2 * experts + 2)
        if _distributed():
            dist.all_reduce(counts)  # every rank applies the same bias update
        self.model.update_router_bias(counts)
        tokens = float(targets.numel())
        for outer in (self.outer, self.outer_experts):
            if outer is not None:
                outer.step(tokens)  # the outer sync at a round's end (a collective)
        return StepResult(loss=loss.detach(), counts=counts)


def build_step(model_cfg: ModelConfig, comp_cfg: CompressionConfig, loop_cfg: LoopConfig, *,
               expert_parallel: int = 1, device: torch.device | None = None, seed: int = 0) -> TrainStep:
    """The model, its parallel wrapping and optimizer on this rank of the current process group.

    Every rank builds the same initial model from ``seed`` (DDP also broadcasts rank 0's dense
    parameters). A checkpoint is loaded into the result afterwards, in place
    (workers/checkpoint.py), so resuming and starting share this one path.
    """
    device = device or torch.device("cpu")
    if loop_cfg.precision == "fp16" and comp_cfg.method == "powersgd":
        raise ValueError("train.precision 'fp16' cannot run with compression.method 'powersgd': PowerSGD's "
                         "error memory would keep loss-scaled values and an overflowed step's inf/NaN for good; "
                         "use precision bf16, or method topk or none")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = (parallel.build_groups(world, rank, expert_parallel, timeout=EP_COLLECTIVE_TIMEOUT)
              if expert_parallel > 1 else None)
    torch.manual_seed(seed)
    model = MoETransformer(model_cfg).to(device)
    if comp_cfg.method == "local":
        return _build_local_step(model, comp_cfg, loop_cfg, groups)
    if groups is not None:
        parallel.apply_expert_parallel(model, groups.ep_group)  # this rank keeps its experts' rows
        parallel.ignore_experts_in_ddp(model)  # experts: synced over their replicas by ExpertGradSync
    optimizer = build_optimizer(model, loop_cfg, comp_cfg)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type != "cpu" else None,
                                  forward_sync_buffers=False)  # router biases move identically everywhere
    guard = compression.LossScaleGuard() if loop_cfg.precision == "fp16" and comp_cfg.method == "topk" else None
    comm = compression.register(ddp, comp_cfg, guard=guard)
    esync = parallel.ExpertGradSync(model, groups.expert_dp_group, comp_cfg, guard) if groups is not None else None
    return TrainStep(model=model, forward=ddp, optimizer=optimizer, loop=loop_cfg, compression=comp_cfg,
                     comm=comm, esync=esync, groups=groups, guard=guard)


def _build_local_step(model: MoETransformer, comp_cfg: CompressionConfig, loop_cfg: LoopConfig,
                      groups: parallel.ParallelGroups | None) -> TrainStep:
    """method local: no DDP (nothing is synced during a round); the dense parameters' outer sync
    spans the world, the experts' spans their replicas (the expert-DP group). The token all-to-all
    of expert parallelism still runs every step, inside the forward."""
    experts: set[str] = set()
    if groups is not None:
        parallel.apply_expert_parallel(model, groups.ep_group)
        experts = set(expert_param_names(model))
    named = dict(model.named_parameters())
    outer = LocalSGD({n: p for n, p in named.items() if n not in experts}, comp_cfg)
    outer_experts = (LocalSGD({n: p for n, p in named.items() if n in experts}, comp_cfg, groups.expert_dp_group)
                     if groups is not None else None)
    return TrainStep(model=model, forward=model, optimizer=build_optimizer(model, loop_cfg, comp_cfg), loop=loop_cfg,
                     compression=comp_cfg, groups=groups, outer=outer, outer_experts=outer_experts)


def _scale_expert_grads(model: MoETransformer) -> None:
    """Local steps with EP: an expert's gradient is the SUM over its EP group's ranks of their losses'
    gradients (the all-to-all backward), so 1 / EP size makes it the mean over the tokens it saw, as
    ExpertGradSync's rule does before averaging over replicas (workers/moe/grad_sync.py)."""
    for moe in model.moe_layers():
        scale = 1.0 / getattr(moe.experts, "ep_size", 1)
        if scale != 1.0:
            for p in moe.experts.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)


@dataclass
class _ExpertPart:
    """The experts' outer sync as workers/checkpoint.py reads an expert sync (its ``.state``)."""

    state: LocalSGD


@dataclass
class EvalResult:
    loss: float | None  # mean next-token loss over every rank's tokens; None when there were none
    tokens: int
    counts: torch.Tensor | None  # (layers, 2 * experts + 2) this rank's routing counts, summed over batches


@torch.no_grad()
def evaluate(model: MoETransformer, batches: Iterable[torch.Tensor], max_batches: int) -> EvalResult:
    """Held-out loss in eval mode (no capacity dropping), over up to ``max_batches`` batches
    (batch, seq_len + 1) per rank; the loss is summed over ranks inside a process group (every rank
    calls this, with or without batches)."""
    totals = torch.zeros(2, dtype=torch.float64)  # (loss sum, token count)
    counts = None
    was_training = model.training
    model.eval()
    try:
        for i, x in enumerate(batches):
            if i >= max_batches:
                break
            logits = model(x[:, :-1])  # (batch, seq_len, vocab)
            totals[0] += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            totals[1] += x[:, 1:].numel()
            c = model.router_counts().cpu()  # (layers, 2 * experts + 2)
            counts = c if counts is None else counts + c
    finally:
        model.train(was_training)
    if _distributed():
        dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item() if totals[1] > 0 else None
    return EvalResult(loss=loss, tokens=int(totals[1]), counts=counts)
