"""Per-worker training loop under Ray Train: shard -> model -> compressed sync -> step -> report.

Runs inside each Ray Train worker. Ray Train has already initialized the process group (gloo, nccl
or hccl); this loop wraps the plain model in DDP, registers the compression hook, streams packed
batches from its Ray Data shard, sends rank 0's progress to the driver every ``log_every`` steps
(workers/progress.py) and checkpoints every ``checkpoint_every`` steps and at the end.

With ``expert_parallel`` > 1 the routed experts are sharded over expert-parallel groups and
tokens reach them by all-to-all (workers/moe/parallel.py); dense parameters stay data-parallel
under DDP and expert gradients are averaged over their replicas with the same compression.

Checkpoints are world-size independent (workers/checkpoint.py): a job saved on N workers resumes on
M workers and another EP size, with its optimizer moments, error-feedback residuals (carried as the
mean over workers), router biases and data position.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from workers import checkpoint, compression
from workers.compression import CompressionConfig
from workers.config import LoopConfig
from workers.device import torch_device
from workers.moe import parallel
from workers.moe.model import ModelConfig, MoETransformer
from workers.moe.stats import routing_stats
from workers.progress import ProgressChannel

# Collective timeout of the expert-parallel groups (torch's default for new groups is 30 minutes).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def final_window(steps: int) -> int:
    """Steps averaged into final_loss: the last 10% of the run, at least 1 and at most 50."""
    return max(1, min(50, steps // 10))


def build_optimizer(model: torch.nn.Module, cfg: LoopConfig, comp: CompressionConfig) -> torch.optim.Optimizer:
    # Matrices decay; norms and other vectors do not (the usual GPT recipe).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if comp.hook_owns_optimizer_state:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


class _Position:
    """Where the loop is in the data: epoch and batches consumed in it by each worker.

    Saved as sequences consumed by all workers, so a resume on another world size skips the same
    share of the epoch.
    """

    def __init__(self, epoch: int = 0, batch_in_epoch: int = 0):
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    @classmethod
    def from_meta(cls, meta: dict[str, Any], world: int, batch_size: int) -> _Position:
        return cls(meta["epoch"], meta["sequences_in_epoch"] // (world * batch_size))


def _batches(shard: Any, batch_size: int, seed: int, pos: _Position, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless packed batches from this worker's Ray Data shard; a new epoch when one runs out.

    Ray Train splits the dataset with equal=True, so every worker sees the same number of batches
    per epoch and the DDP collectives stay in step. On resume the batches of the interrupted epoch
    that were already trained on are skipped.
    """
    skip = pos.batch_in_epoch
    while True:
        seen = 0
        it = shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long, device=device, drop_last=True,
                                      local_shuffle_buffer_size=batch_size * 16,
                                      local_shuffle_seed=seed + pos.epoch)
        for batch in it:
            seen += 1
            if seen <= skip:
                continue
            pos.batch_in_epoch = seen
            yield batch["input_ids"]  # (batch, seq_len + 1)
        if seen == 0:
            raise RuntimeError(f"the training data yields no batch of {batch_size} sequences per worker; "
                               "use a larger corpus (data.source, data.max_bytes) or a smaller train.batch_size")
        skip = 0
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0


def _evaluate(model: MoETransformer, shard: Any, cfg: LoopConfig, device: torch.device) -> float | None:
    """Mean next-token loss over up to eval_batches held-out batches per worker, averaged over workers."""
    totals = torch.zeros(2, dtype=torch.float64)  # (loss sum, token count)
    if shard is not None and cfg.eval_batches > 0:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(shard.iter_torch_batches(batch_size=cfg.batch_size, dtypes=torch.long,
                                                                 device=device, drop_last=False)):
                if i >= cfg.eval_batches:
                    break
                x = batch["input_ids"]  # (batch, seq_len + 1)
                logits = model(x[:, :-1])  # (batch, seq_len, vocab)
                totals[0] += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
                totals[1] += x[:, 1:].numel()
        model.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def _layer_stats(counts: torch.Tensor) -> dict[str, Any]:
    stats = routing_stats(counts)
    return {"max_vio": [round(s["max_vio"], 4) for s in stats],
            "drop_frac": [round(s["drop_frac"], 5) for s in stats]}


def _save(state: dict[str, Any], meta: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """Collective checkpoint + report: every rank takes part; rank 0's folder holds the files."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(Path(tmp), meta=meta, rank=rank, **state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                         checkpoint_dir_name=f"step-{meta['step']:08d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: config = {"model", "compression", "loop": dicts; "seed", "device", "has_val",
    "expert_parallel"; "progress": the driver's ray.util.queue.Queue}."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = LoopConfig(**config["loop"])
    model_cfg = ModelConfig(**config["model"])
    comp_cfg = CompressionConfig(**config["compression"])
    seed = config["seed"]
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = torch_device(config["device"])
    channel = ProgressChannel(config["progress"])

    ep = config["expert_parallel"]
    groups = parallel.build_groups(world, rank, ep, timeout=COLLECTIVE_TIMEOUT) if ep > 1 else None

    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's dense parameters)
    model = MoETransformer(model_cfg).to(device)
    if groups is not None:
        parallel.apply_expert_parallel(model, groups.ep_group)  # this rank keeps its experts' rows
        parallel.ignore_experts_in_ddp(model)  # experts: synced over their replicas by ExpertGradSync
    optimizer = build_optimizer(model, cfg, comp_cfg)
    start, pos, base_bytes = 0, _Position(), torch.zeros(2, dtype=torch.float64)
    saved = ray.train.get_checkpoint()
    with saved.as_directory() if saved else contextlib.nullcontext() as saved_dir:
        if saved_dir:
            saved_dir = Path(saved_dir)
            meta = checkpoint.read_meta(saved_dir)
            checkpoint.load_model_and_optimizer(saved_dir, model=model, optimizer=optimizer, groups=groups,
                                                device=device)
            start, pos = meta["step"], _Position.from_meta(meta, world, cfg.batch_size)
            base_bytes = torch.tensor([meta["wire_bytes"], meta["dense_bytes"]], dtype=torch.float64)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type != "cpu" else None,
                                      forward_sync_buffers=False)  # router biases move identically everywhere
        comm = compression.register(ddp, comp_cfg)
        esync = parallel.ExpertGradSync(model, groups.expert_dp_group, comp_cfg) if groups is not None else None
        if saved_dir:
            checkpoint.load_compression(saved_dir, model=model, comm=comm, esync=esync, groups=groups)
            if rank == 0:
                channel.note(f"resuming from step {start} (saved by {meta['world_size']} workers, "
                             f"EP {meta['expert_parallel']}; now {world} workers, EP {ep})")
    state = {"model": model, "optimizer": optimizer, "comm": comm, "esync": esync, "groups": groups}
    clip = None if comp_cfg.hook_owns_optimizer_state or comp_cfg.clip_norm else cfg.grad_clip

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    batches = _batches(train_shard, cfg.batch_size, seed, pos, device)
    n_layers, n_experts = model_cfg.n_layers, model_cfg.n_routed_experts
    window_counts = torch.zeros(n_layers, 2 * n_experts + 2)  # routing counts since the last progress line
    tail_counts = torch.zeros(n_layers, 2 * n_experts + 2)  # routing counts over the final window
    tail = final_window(cfg.steps)
    losses: list[float] = []
    tokens_per_step = world * cfg.batch_size * model_cfg.max_seq_len
    t_last = time.perf_counter()
    step_last = start
    steady_time, steady_steps = 0.0, 0  # steps after this attempt's first (pipeline warm-up excluded)

    def byte_totals() -> torch.Tensor:
        wire = comm.wire_bytes + (esync.wire_bytes if esync else 0)
        dense = comm.dense_bytes + (esync.dense_bytes if esync else 0)
        totals = torch.tensor([wire, dense], dtype=torch.float64)
        dist.all_reduce(totals)
        return totals + base_bytes

    def meta_for(step: int, totals: torch.Tensor) -> dict[str, Any]:
        return {"step": step, "epoch": pos.epoch, "sequences_in_epoch": pos.batch_in_epoch * world * cfg.batch_size,
                "world_size": world, "expert_parallel": ep,
                "wire_bytes": totals[0].item(), "dense_bytes": totals[1].item()}

    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        x = next(batches)  # (batch, seq_len + 1)
        inputs, targets = x[:, :-1], x[:, 1:]  # (batch, seq_len) each
        tokens_per_step = world * inputs.numel()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if comp_cfg.hook_owns_optimizer_state:  # the hook weights error feedback by the schedule
            comm.lr_scale = lr / cfg.lr
            if esync is not None:
                esync.state.lr_scale = lr / cfg.lr
        logits = ddp(inputs)  # (batch, seq_len, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + model.aux_loss()).backward()  # the comm hook syncs dense gradients bucket by bucket here
        if esync is not None:
            esync.sync()  # expert gradients, over the replicas of each expert
        if clip and groups is not None:
            parallel.clip_grad_norm_(model, clip, groups)  # the global norm, experts sharded
        elif clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        counts = model.router_counts()  # (layers, 2 * experts + 2)
        dist.all_reduce(counts)  # every rank applies the same bias update
        model.update_router_bias(counts)
        window_counts += counts.cpu()
        if step >= cfg.steps - tail:
            tail_counts += counts.cpu()
        losses.append(loss.item())
        if step > start:
            steady_time += time.perf_counter() - t_step
            steady_steps += 1

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            stats = torch.tensor([sum(losses[-(done - step_last):]), done - step_last], dtype=torch.float64)
            dist.all_reduce(stats)
            totals = byte_totals()
            if rank == 0:
                now = time.perf_counter()
                layer = _layer_stats(window_counts)
                channel.progress({
                    "step": f"{done}/{cfg.steps}", "loss": (stats[0] / stats[1]).item(), "lr": lr_at(step, cfg),
                    "tokens_per_s": tokens_per_step * (done - step_last) / (now - t_last),
                    "wire_bytes": int(totals[0]), "dense_bytes": int(totals[1]),
                    "compression": (totals[1] / totals[0]).item() if totals[0] > 0 else 1.0,
                    "max_vio": max(layer["max_vio"]), "drop_frac": max(layer["drop_frac"]),
                    "dense_fallback_buckets": len(comm.dense_fallback_buckets),
                })
                t_last = now
            step_last = done
            window_counts.zero_()
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            totals = byte_totals()
            _save(state, meta_for(done, totals), {"step": done, "loss": losses[-1]}, rank)

    eval_loss = _evaluate(model, val_shard, cfg, device)
    window = torch.tensor([sum(losses[-tail:]), len(losses[-tail:])], dtype=torch.float64)
    dist.all_reduce(window)
    totals = byte_totals()
    metrics = {
        "steps": cfg.steps,
        "final_loss": (window[0] / window[1]).item() if window[1] > 0 else None,
        "final_loss_window": tail,
        "eval_loss": eval_loss,
        "tokens_per_s": tokens_per_step * steady_steps / steady_time if steady_steps else 0.0,
        "wire_bytes": int(totals[0]),
        "dense_bytes": int(totals[1]),
        "compression": (totals[1] / totals[0]).item() if totals[0] > 0 else 1.0,
        "world_size": world,
        "moe": _layer_stats(tail_counts),
    }
    _save(state, meta_for(cfg.steps, totals), metrics, rank)
