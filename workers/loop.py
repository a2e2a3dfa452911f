"""Per-worker training loop: setup -> steps -> reports and checkpoints.

Runs inside each Ray Train worker (``train_loop_per_worker``), which has initialized the process
group (gloo, nccl or hccl), or in one process that is its whole world (``run_loop`` with a
LocalSession: a one-worker sweep trial in its Tune actor); workers/session.py is all it asks of
either. ``_setup`` builds the product's training step (workers/step.py: DDP with the compression
hook, expert parallelism, optimizer) and restores the latest checkpoint into it; the loop streams
this worker's packed rows (workers/data/stream.py) through that step; ``_Reporter`` turns the steps
into rank 0's progress records (workers/progress.py) and the final metrics; a checkpoint is taken
every ``checkpoint_every`` steps, at the end, and at the end of any step during which a "checkpoint
now" request arrived (workers/control.py: preemption, resize, drain, a stopping driver) or, asked
every ``preemption_check_every`` steps, Ray Train announced that a node of the job is being preempted
(workers/interrupts.py).

A job may span devices (resources.pools): each worker takes its device from the node it was
placed on (``place_worker``). Every worker steps one global data position (workers/data/order.py)
and reads only its own sequences of each step (workers/data/stream.py): ``batch_size`` of them
(``train.split: equal``), or a share that follows its measured speed (``speed``,
workers/balance.py). The checkpoint stores that position, so a resume on any world size trains each
sequence of an epoch exactly once and reads nothing it consumed.

Checkpoints are world-size independent (workers/checkpoint.py): a job saved on N workers resumes on
M workers and another EP size, with its optimizer moments, error-feedback residuals (carried as the
mean over workers), router biases and data position.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from workers import checkpoint
from workers.balance import ForwardTimer, SpeedSplit
from workers.config import Device, LoopConfig
from workers.contracts import MoEStats, RunMetrics, WorkerConfig
from workers.control import ControlChannel
from workers.data import stream
from workers.data.stream import TrainPlan, ray_reads
from workers.device import lease_device, torch_device
from workers.interrupts import PreemptionWatch, agreed_request, describe_preemption, hold
from workers.moe.stats import routing_stats
from workers.progress import ProgressChannel, ProgressRecord
from workers.session import RayTrainSession, Session
from workers.step import TrainStep, build_step, evaluate, final_window, lr_at

# Told about each step's batch on every rank: (step, epoch, this rank's sequence ids in the epoch,
# its rows (rows, seq_len + 1) on the device). None in the product; a test that checks which sequences
# each rank trains on passes one (tests/integration/training/test_exactly_once.py).
BatchObserver = Callable[[int, int, list[int], torch.Tensor], None]


class _Position:
    """Where the loop is in the data: the global position (workers/data/order.py), the same on every
    rank whatever the world size; until the stream starts, the checkpoint's meta it resumes from."""

    def __init__(self, meta: dict[str, Any] | None = None):
        self.meta, self.stream = meta, None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> _Position:
        return cls(meta)

    @property
    def epoch(self) -> int:
        return self.stream.state.epoch if self.stream else (self.meta or {}).get("epoch", 0)

    @property
    def sequence(self) -> int:
        """Sequences of the epoch trained, over all ranks."""
        return self.stream.state.consumed if self.stream else (self.meta or {}).get("sequences_in_epoch", 0)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state.state_dict()

    def start(self, plan: TrainPlan, seed: int, rank: int) -> None:
        """This rank's stream from the saved position (workers/data/stream.py); with
        ``on_corrupt: skip`` the ranks merge the corrupt units they find at each step (collective)."""
        state = stream.state_for(plan, seed, self.meta)
        self.stream = stream.RankStream(plan, state, rank, stream.ray_reads(plan),
                                        _merge_corrupt if plan.on_corrupt == "skip" else None)

    def next(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        """This rank's ``rows[rank]`` sequences of the next step: (their ids in the epoch,
        (rows, seq_len + 1) on the host)."""
        ids, x = self.stream.next(rows)
        return ids.tolist(), torch.from_numpy(x.astype(np.int64))


def _merge_corrupt(found: set[int]) -> set[int]:
    """Collective: the corrupt units every rank found."""
    merged: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(merged, sorted(found))
    return {u for units in merged for u in units}


def _layer_stats(counts: torch.Tensor) -> MoEStats:
    stats = routing_stats(counts)
    return MoEStats(max_vio=[round(s["max_vio"], 4) for s in stats], drop_frac=[round(s["drop_frac"], 5) for s in stats])


@dataclass
class Placement:
    """What this worker was given: its device and, in a job that spans devices, its leased device."""

    device: Device
    device_ids: list[str]  # the leased device's ids; empty when Ray's bundle reserved it or for cpu
    lease: Any = None  # the lease actor (workers/device.py): the device is this worker's while it lives


def place_worker(cfg: WorkerConfig) -> Placement:
    """This worker's device, from the node Ray placed it on, and its device where the job leases them."""
    import ray

    device = cfg.device
    if cfg.node_devices:
        node = ray.get_runtime_context().get_node_id()
        if node not in cfg.node_devices:
            raise RuntimeError(f"worker placed on node {node}, which is in none of the job's pools")
        device = cfg.node_devices[node]
    if not cfg.lease_devices or device == "cpu":
        return Placement(device, [])
    lease, ids = lease_device(device)
    return Placement(device, ids, lease)


class _Run:
    """One worker's run: the step, where it is, and the byte totals carried over from a resume."""

    def __init__(self, cfg: WorkerConfig, step: TrainStep, session: Session, placement: Placement,
                 tokenizer_json: str | None = None):
        self.cfg, self.step, self.session, self.placement = cfg, step, session, placement
        self.rank, self.world = session.rank, session.world
        self.tokenizer_json = tokenizer_json  # stored in every checkpoint (the data's tokenizer)
        self.start, self.pos = 0, _Position()
        self.base_bytes = torch.zeros(2, dtype=torch.float64)  # (wire, dense) before this attempt

    def sent(self) -> dict[str, Any]:
        """Bytes sent and what dense sync would have sent, over every rank and attempt, and dense /
        sent (1 where nothing is sent: one worker); collective."""
        totals = torch.tensor(self.step.byte_counts(), dtype=torch.float64)
        dist.all_reduce(totals)
        wire, dense = (int(t) for t in totals + self.base_bytes)
        return {"wire_bytes": wire, "dense_bytes": dense, "compression": dense / wire if wire > 0 else 1.0}

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        """Collective checkpoint + report: every rank takes part; rank 0's folder holds the files."""
        self.step.finish_round()  # method local: a checkpoint closes the round (DESIGN.md, "Local steps")
        sent = self.sent()
        meta = {"step": step, "epoch": self.pos.epoch,
                "sequences_in_epoch": self.pos.sequence, "data_state": self.pos.state_dict(),
                "world_size": self.world, "expert_parallel": self.cfg.expert_parallel,
                "wire_bytes": sent["wire_bytes"], "dense_bytes": sent["dense_bytes"],
                "model": self.cfg.model.model_dump()}
        s = self.step
        comm, esync = s.checkpoint_state()
        # Every report carries the bytes so far (a sweep weighs each trial's loss against them).
        metrics = {**sent, **metrics}
        with self.session.staging() as folder:
            checkpoint.save(folder, model=s.model, optimizer=s.optimizer, comm=comm, esync=esync,
                            groups=s.groups, meta=meta, rank=self.rank, scaler=s.scaler,
                            tokenizer_json=self.tokenizer_json)
            self.session.report(metrics, folder if self.rank == 0 else None, f"step-{step:08d}")
        if self.rank == 0:
            self.session.wait_committed()  # the other ranks wait at the next collective


def _setup(cfg: WorkerConfig, session: Session, channel: ProgressChannel, tokenizer_json: str | None) -> _Run:
    """The training step on this rank, restored from the run's latest checkpoint if there is one."""
    rank, world = session.rank, session.world
    torch.set_num_threads(cfg.loop.torch_threads or max(1, (os.cpu_count() or 1) // session.local_world))
    placement = place_worker(cfg)
    device = torch_device(placement.device)
    step = build_step(cfg.model, cfg.compression, cfg.loop, expert_parallel=cfg.expert_parallel, device=device,
                      seed=cfg.seed)
    run = _Run(cfg, step, session, placement, tokenizer_json)
    saved = session.resume_point(cfg.init_checkpoint)
    if saved is None:
        return run
    with saved.as_directory() as saved_dir:
        path = Path(saved_dir)
        # Ray's own fresh download of a remote checkpoint (object stores hold no links) is read as is;
        # a local one only under the job's data roots (workers/confine.py).
        also = () if isinstance(saved.filesystem, pafs.LocalFileSystem) else (saved_dir,)
        meta = checkpoint.read_meta(path, also=also)
        # In place, after DDP and the hooks exist: every rank loads the same files.
        checkpoint.load_model_and_optimizer(path, model=step.model, optimizer=step.optimizer, groups=step.groups,
                                            device=device, scaler=step.scaler, also=also)
        comm, esync = step.checkpoint_state()
        checkpoint.load_compression(path, model=step.model, comm=comm, esync=esync, groups=step.groups, also=also)
    run.start, run.pos = meta["step"], _Position.from_meta(meta)
    run.base_bytes = torch.tensor([meta["wire_bytes"], meta["dense_bytes"]], dtype=torch.float64)
    if rank == 0:
        channel.note(f"resuming from step {run.start} (saved by {meta['world_size']} workers, "
                     f"EP {meta['expert_parallel']}; now {world} workers, EP {cfg.expert_parallel})")
    return run


class _Reporter:
    """Losses, routing counts and timing of the steps: rank 0's progress records every ``log_every``
    steps and the final metrics."""

    def __init__(self, run: _Run, channel: ProgressChannel):
        self.run, self.channel, self.loop = run, channel, run.cfg.loop
        n_layers, n_experts = run.cfg.model.n_layers, run.cfg.model.n_routed_experts
        self.window_counts = torch.zeros(n_layers, 2 * n_experts + 2)  # since the last record
        self.tail_counts = torch.zeros(n_layers, 2 * n_experts + 2)  # over the final window
        self.tail = final_window(self.loop.steps)
        self.losses: list[float] = []
        self.tokens_per_step = 0  # over all ranks, set by add
        self.t_last, self.step_last = time.perf_counter(), run.start
        self.steady_time, self.steady_steps = 0.0, 0  # steps after this attempt's first (warm-up excluded)

    def add(self, step: int, tokens: int, loss: float, counts: torch.Tensor, seconds: float) -> None:
        """``tokens``: over all ranks; ``loss``: this rank's share of the global batch's mean loss,
        times the world size (its loss times its loss weight), so the mean over ranks is that mean."""
        self.tokens_per_step = tokens
        self.window_counts += counts.cpu()
        if step >= self.loop.steps - self.tail:
            self.tail_counts += counts.cpu()
        self.losses.append(loss)
        if step > self.run.start:
            self.steady_time += seconds
            self.steady_steps += 1
        done = step + 1
        if done % self.loop.log_every == 0 or done == self.loop.steps:
            self._record(done)

    def _record(self, done: int) -> None:
        """Collective (loss and byte totals over ranks); rank 0 sends the record."""
        n = done - self.step_last
        stats = torch.tensor([sum(self.losses[-n:]), n], dtype=torch.float64)
        dist.all_reduce(stats)
        sent = self.run.sent()
        if self.run.rank == 0:
            now = time.perf_counter()
            layer = _layer_stats(self.window_counts)
            comm = self.run.step.comm
            self.channel.progress(ProgressRecord(
                step=done, total_steps=self.loop.steps, loss=(stats[0] / stats[1]).item(), lr=lr_at(done - 1, self.loop),
                tokens_per_s=self.tokens_per_step * n / (now - self.t_last),
                **sent, max_vio=max(layer.max_vio), drop_frac=max(layer.drop_frac),
                dense_fallback_buckets=len(comm.dense_fallback_buckets) if comm else 0))
            self.t_last = now
        self.step_last = done
        self.window_counts.zero_()

    def final(self, eval_loss: float | None) -> RunMetrics:
        """Collective."""
        window = torch.tensor([sum(self.losses[-self.tail:]), len(self.losses[-self.tail:])], dtype=torch.float64)
        dist.all_reduce(window)
        sent = self.run.sent()
        return RunMetrics(
            steps=self.loop.steps, final_loss=(window[0] / window[1]).item() if window[1] > 0 else None,
            final_loss_window=self.tail, eval_loss=eval_loss,
            tokens_per_s=self.tokens_per_step * self.steady_steps / self.steady_time if self.steady_steps else 0.0,
            **sent, world_size=self.run.world, moe=_layer_stats(self.tail_counts))


def _check_same_batch(x: torch.Tensor) -> None:
    """Collective: fail when the ranks' ``x`` differ (the data position's fingerprint: ranks that
    disagree on it would read overlapping or missing sequences)."""
    # Position-weighted sum in int64: exact modulo 2**64 in any summation order (threads may differ).
    fingerprint = (x.long() * torch.arange(1, x.numel() + 1, dtype=torch.long).view_as(x)).sum()
    both = torch.stack([fingerprint, -fingerprint])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0] != -both[1]:
        raise RuntimeError("the ranks disagree on the data position (workers/data/order.py); each must step "
                           "it with the same split and seed")


def _eval_batches(plan: TrainPlan | None, rank: int, world: int, loop: LoopConfig,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """This rank's held-out batches (batch, seq_len + 1). Every rank reads the same first units of
    the held-out split (one Ray Data read, a task per unit, as training units are) until they hold the
    ``eval_batches`` global batches wanted, and takes its own slice of each: so every rank evaluates
    the same number of batches (expert parallelism's all-to-all runs in every forward) and a
    held-out split of one unit still feeds every rank. A unit found corrupt under
    ``data.on_corrupt: skip`` is left out by every rank alike (``fail``: the read raises)."""
    if plan is None or not loop.eval_batches:
        return
    wanted = loop.eval_batches * loop.batch_size * world  # rows, all ranks together
    parts, have = [], 0
    read = ray_reads(plan)(plan.units) if plan.units else iter(())
    for _, rows in read:
        if not isinstance(rows, str):
            parts.append(rows)
            have += len(rows)
        if have >= wanted:
            read.close()
            break
    rows = np.concatenate(parts)[:wanted] if parts else np.empty((0, 0), np.uint16)
    per_rank = min(loop.batch_size, len(rows) // world)  # a short split: smaller batches, not fewer ranks
    for start in range(0, len(rows) - per_rank * world + 1, per_rank * world) if per_rank else ():
        mine = rows[start + rank * per_rank:start + (rank + 1) * per_rank]
        yield torch.from_numpy(mine.astype(np.int64)).to(device)


def train_loop_per_worker(config: dict[str, Any], on_batch: BatchObserver | None = None) -> None:
    """Ray Train entry: config = {"worker": a WorkerConfig dump; "progress": the driver's
    ray.util.queue.Queue or None; "tokenizer"; "data" and "val": the TrainPlans of the training and
    held-out splits}. ``on_batch``: see BatchObserver (Ray Train passes only config)."""
    run_loop(config, RayTrainSession(), on_batch)


def run_loop(config: dict[str, Any], session: Session, on_batch: BatchObserver | None = None) -> None:
    """The loop on this rank of ``session`` (workers/session.py); ``config`` as train_loop_per_worker's."""
    started_at = time.time()  # requests made before this were meant for an earlier attempt
    cfg = WorkerConfig.model_validate(config["worker"])
    channel = ProgressChannel(config.get("progress"))
    control = ControlChannel(cfg.control_dir) if cfg.control_dir else None
    run = _setup(cfg, session, channel, config.get("tokenizer"))
    step_fn, loop = run.step, cfg.loop
    device = next(step_fn.model.parameters()).device
    # Every rank steps the one global position and reads only its own rows of each step: batch_size
    # (equal), or a share that follows the measured speeds (speed).
    run.pos.start(config["data"], cfg.seed, run.rank)
    split = SpeedSplit(loop.batch_size * run.world, run.world, run.rank, loop.split_smoothing)
    timer = ForwardTimer(step_fn.model, device) if loop.split == "speed" else None
    reporter = _Reporter(run, channel)
    preemption = PreemptionWatch(cfg.preemption_check_every)

    for step in range(run.start, loop.steps):
        t_step = time.perf_counter()
        ids, x = run.pos.next(split.rows)  # (rows, seq_len + 1) on the host: this rank's
        epoch, tokens = run.pos.epoch, split.total_rows * (x.shape[1] - 1)
        check = (step + 1 - run.start) % loop.split_every == 0
        measure = timer is not None and check
        if check:
            _check_same_batch(torch.tensor(run.pos.stream.state.fingerprint()))
        x, weight = x.to(device), split.weight
        if timer is not None:
            timer.armed, timer.seconds = measure, 0.0
        result = step_fn(step, x, weight)
        if on_batch is not None:
            on_batch(step, epoch, ids, x)
        if measure:
            timer.armed = False
            split.update(len(x) / timer.seconds)
        reporter.add(step, tokens, result.loss.item() * weight, result.counts, time.perf_counter() - t_step)
        done = step + 1
        request = agreed_request(control, run.rank, started_at) if done < loop.steps else None
        notice = preemption.poll(done) if done < loop.steps else None
        if request is not None or notice is not None or (done % loop.checkpoint_every == 0 and done < loop.steps):
            run.save(done, {"step": done, "loss": reporter.losses[-1]})
            if request is not None and run.rank == 0 and control is not None:
                control.confirm(request, done)
                channel.note(f"checkpoint at step {done} on request ({request.reason})")
            if request is not None and request.stop:
                return  # asked to end here (a sweep's trial stopped on request): its checkpoint was reported
            if request is not None and request.hold_s > 0:
                hold(request, control, run.rank, done)  # the requester stops the job meanwhile
            if notice is not None and run.rank == 0:
                channel.note(f"checkpoint at step {done} on a preemption notice: {describe_preemption(notice)}")
        if done == cfg.stop_at_step and done % loop.checkpoint_every == 0 and done < loop.steps:
            return  # the end of a PBT segment (jobs/runtime/sweep_trial.py): its checkpoint was just reported

    step_fn.finish_round()  # method local: evaluate the synced weights
    val = _eval_batches(config.get("val"), run.rank, run.world, loop, device)
    eval_loss = evaluate(step_fn.model, val, loop.eval_batches).loss
    metrics = reporter.final(eval_loss)
    run.save(loop.steps, metrics.model_dump())
    request = control.pending() if control is not None and run.rank == 0 else None
    if request is not None:  # the final checkpoint answers a request that came in the last step
        control.confirm(request, loop.steps)
