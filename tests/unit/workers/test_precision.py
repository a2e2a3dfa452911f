"""Mixed precision (``train.precision``) through the product's training step (workers/step.py) on 2
gloo ranks: bf16 trains; fp16 with an inf gradient injected on ONE rank skips the step on both,
leaves error-feedback residuals, the hook's Adam moments and the optimizer state bit-identical and
halves the loss scale; fp16 residuals are unscaled (equal to the fp32 run's on the same data); the
loss scale survives a checkpoint; fp16 with PowerSGD is refused.

The golden run (tests/unit/workers/test_golden.py) guards that precision fp32 leaves the curves unchanged.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.support.distributed import results_fixture, scenario_values
from tests.support.golden import LOOP, MODEL, batches
from workers import checkpoint, compression
from workers.compression import CompressionConfig
from workers.device import autocast, grad_scaler
from workers.moe.model import MoETransformer
from workers.step import TrainStep, build_optimizer, build_step

WORLD = 2
COLLECTIVE_TIMEOUT_S = 120
JOIN_TIMEOUT_S = 600
TOPK = CompressionConfig(method="topk", density=0.05, selection="exact")
ADAM_TOPK = TOPK.model_copy(update={"precondition": "adam", "clip_norm": 1.0})
# DDP buckets of ~10 KB: the golden model's 44k parameters fall into several buckets, so an overflow
# in the last bucket must stop the first buckets' error feedback (the guard defers them).
SMALL_BUCKET_MB = 0.01
# bf16 on the golden data: the mean loss of the last 5 of 30 steps is well below that of the first 5
# (measured: 5.53 -> 3.0 on CPU, as fp32); a broken bf16 path stays near ln(256) = 5.5.
BF16_STEPS = 30
BF16_MIN_LOSS_DROP = 1.0
# fp16 vs fp32 residuals after one step from the same weights on the same data. Their norms agree to
# ~1e-4 (measured 5e-5); elementwise, fp16 autocast's rounding moves the gradients by ~1e-3 and flips
# a few near-ties of the top-k selection (measured relative L2 difference <= 0.033). Residuals kept
# in loss-scaled units would be 2**16 times too large.
RESIDUAL_NORM_RTOL = 1e-2
RESIDUAL_DIFF_RTOL = 0.1


def _loop(precision: str, steps: int = LOOP.steps):
    return LOOP.model_copy(update={"precision": precision, "steps": steps})


def _state(step: TrainStep) -> dict[str, torch.Tensor]:
    """Everything a skipped step must leave alone, cloned: this rank's residual buckets, the hook's
    state (mean over ranks, every kind: residual, Adam moments), the optimizer state, the weights."""
    out = {f"residual/bucket{i}": r.clone() for i, r in step.comm.residuals.items()}
    out |= {f"hook/{k}": v.clone() for k, v in step.comm.export_state().items()}
    for name, p in step.model.named_parameters():
        out[f"param/{name}"] = p.detach().clone()
        for kind, value in step.optimizer.state.get(p, {}).items():
            out[f"optim/{kind}/{name}"] = value.clone()
    if step.esync is not None:
        out |= {f"expert/{k}": v.clone() for k, v in step.esync.state.export_state(step.groups.expert_dp_group).items()}
    return out


@contextlib.contextmanager
def _inf_gradient(param: torch.nn.Parameter, inject: bool) -> Iterator[None]:
    """An inf in one entry of ``param``'s gradient during the next backward, where ``inject``."""
    def _hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    handle = param.register_hook(_hook) if inject else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _small_bucket_step(comp: CompressionConfig, rank: int) -> TrainStep:
    """build_step's wiring with DDP buckets of SMALL_BUCKET_MB (build_step keeps DDP's 25 MB)."""
    torch.manual_seed(0)
    model = MoETransformer(MODEL)
    ddp = DistributedDataParallel(model, bucket_cap_mb=SMALL_BUCKET_MB, forward_sync_buffers=False)
    guard = compression.LossScaleGuard()
    comm = compression.register(ddp, comp, guard=guard)
    return TrainStep(model=model, forward=ddp, optimizer=build_optimizer(model, _loop("fp16"), comp),
                     loop=_loop("fp16"), compression=comp, comm=comm, guard=guard)


def _skip_case(rank: int, make: Callable[[], TrainStep], target: Callable[[TrainStep], torch.nn.Parameter],
               inject_rank: int = 0) -> dict:
    step = make()
    data = batches(rank)  # (STEPS, BATCH, SEQ + 1)
    for i in range(3):  # past DDP's bucket rebuild, residuals and moments non-zero
        step(i, data[i])
    before, scale, hook_steps = _state(step), step.scaler.get_scale(), step.comm.steps
    with _inf_gradient(target(step), rank == inject_rank):
        step(3, data[3])
    after = _state(step)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    out = {"changed": changed, "keys": len(before), "buckets": len(step.comm.residuals),
           "scale_before": scale, "scale_after": step.scaler.get_scale(),
           "hook_steps": (hook_steps, step.comm.steps), "skipped": step.guard.skipped_steps}
    loss = step(4, data[4]).loss  # the next step trains again
    out["next_finite"] = bool(torch.isfinite(loss)) and not torch.equal(before["param/norm.weight"],
                                                                       step.model.norm.weight.detach())
    return out


def _scenario_skip_topk_ef(rank: int) -> dict:
    """Plain top-k + EF into AdamW, inf in the embedding (DDP's last bucket) on rank 0."""
    return _skip_case(rank, lambda: _small_bucket_step(TOPK, rank), lambda s: s.model.tok_emb.weight)


def _scenario_skip_topk_ef_first_bucket(rank: int) -> dict:
    """The same, inf in the final norm (DDP's first bucket) on rank 1."""
    return _skip_case(rank, lambda: _small_bucket_step(TOPK, rank), lambda s: s.model.norm.weight, inject_rank=1)


def _scenario_skip_adam(rank: int) -> dict:
    """precondition adam (the hook owns Adam's moments; SGD applies), through build_step."""
    return _skip_case(rank, lambda: build_step(MODEL, ADAM_TOPK, _loop("fp16")), lambda s: s.model.tok_emb.weight)


def _scenario_skip_adam_ep2(rank: int) -> dict:
    """Expert parallel 2: the inf is in an expert (synced by ExpertGradSync, after DDP's decision)."""
    return _skip_case(rank, lambda: build_step(MODEL, ADAM_TOPK, _loop("fp16"), expert_parallel=2),
                      lambda s: s.model.layers[0].moe.experts.local.w1, inject_rank=1)


def _scenario_bf16_trains(rank: int) -> list[float]:
    step = build_step(MODEL, ADAM_TOPK, _loop("bf16", BF16_STEPS))
    curve = []
    for i, x in enumerate(batches(rank)[:BF16_STEPS]):
        mean = step(i, x).loss.clone()
        dist.all_reduce(mean)
        curve.append(mean.item() / WORLD)
    return curve


def _residuals_after(precision: str, rank: int) -> tuple[torch.Tensor, float]:
    step = build_step(MODEL, TOPK, _loop(precision))
    step(0, batches(rank)[0])  # one step: the same weights, so only the gradients' rounding differs
    flat = torch.cat([step.comm.residuals[i] for i in sorted(step.comm.residuals)])  # (params,)
    return flat, step.scaler.get_scale() if step.scaler is not None else 1.0


def _scenario_residuals_unscaled(rank: int) -> dict:
    r32, _ = _residuals_after("fp32", rank)
    r16, scale = _residuals_after("fp16", rank)
    return {"scale": scale, "rel_diff": ((r16 - r32).norm() / r32.norm()).item(),
            "norm_ratio": (r16.norm() / r32.norm()).item()}


def _scenario_scaler_checkpoint(rank: int) -> dict:
    step = build_step(MODEL, TOPK, _loop("fp16"))
    data = batches(rank)
    step(0, data[0])
    with _inf_gradient(step.model.tok_emb.weight, rank == 0):
        step(1, data[1])
    folder = [tempfile.mkdtemp(prefix="precision-ckpt-") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    path = Path(folder[0])
    checkpoint.save(path, model=step.model, optimizer=step.optimizer, comm=step.comm, esync=None, groups=None,
                    meta={"step": 2}, rank=rank, scaler=step.scaler)
    dist.barrier()
    fresh = build_step(MODEL, TOPK, _loop("fp16"))
    fresh_scale = fresh.scaler.get_scale()
    checkpoint.load_model_and_optimizer(path, model=fresh.model, optimizer=fresh.optimizer, groups=None,
                                        device=torch.device("cpu"), scaler=fresh.scaler)
    return {"saved": step.scaler.get_scale(), "fresh": fresh_scale, "loaded": fresh.scaler.get_scale()}


def _scenario_fp16_powersgd_refused(rank: int) -> str:
    with pytest.raises(ValueError) as err:
        build_step(MODEL, CompressionConfig(method="powersgd"), _loop("fp16"))
    return str(err.value)


SCENARIOS = {
    "skip_topk_ef": _scenario_skip_topk_ef,
    "skip_topk_ef_first_bucket": _scenario_skip_topk_ef_first_bucket,
    "skip_adam": _scenario_skip_adam,
    "skip_adam_ep2": _scenario_skip_adam_ep2,
    "bf16_trains": _scenario_bf16_trains,
    "residuals_unscaled": _scenario_residuals_unscaled,
    "scaler_checkpoint": _scenario_scaler_checkpoint,
    "fp16_powersgd_refused": _scenario_fp16_powersgd_refused,
}

dist_results = results_fixture(__name__, WORLD, COLLECTIVE_TIMEOUT_S, JOIN_TIMEOUT_S)


def test_autocast_and_scaler_follow_precision() -> None:
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with autocast("fp32", cpu):
        assert (a @ b).dtype == torch.float32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(precision, cpu):
            assert (a @ b).dtype == dtype
    assert grad_scaler("fp32", cpu) is None and grad_scaler("bf16", cpu) is None
    scaler = grad_scaler("fp16", cpu)
    assert scaler is not None and scaler.is_enabled() and math.log2(scaler.get_scale()).is_integer()


@pytest.mark.parametrize("name", ["skip_topk_ef", "skip_topk_ef_first_bucket", "skip_adam", "skip_adam_ep2"])
def test_fp16_inf_on_one_rank_skips_the_step_everywhere(dist_results, name) -> None:
    for rank, value in enumerate(scenario_values(dist_results, name)):
        assert value["changed"] == [], f"rank {rank}: a skipped step changed {value['changed']}"
        assert value["keys"] > 0
        assert value["scale_after"] == value["scale_before"] / 2, rank
        assert value["hook_steps"][0] == value["hook_steps"][1], "the hook counted a skipped step"
        assert value["skipped"] == 1 and value["next_finite"], rank
    if name.startswith("skip_topk_ef"):
        assert all(v["buckets"] >= 3 for v in scenario_values(dist_results, name))  # the deferral is exercised


def test_bf16_trains(dist_results) -> None:
    curve = scenario_values(dist_results, "bf16_trains")[0]
    assert all(math.isfinite(x) for x in curve)
    assert sum(curve[:5]) / 5 - sum(curve[-5:]) / 5 > BF16_MIN_LOSS_DROP, curve


def test_fp16_residuals_are_unscaled(dist_results) -> None:
    for value in scenario_values(dist_results, "residuals_unscaled"):
        assert value["scale"] == 2.0**16  # the loss was scaled by 2**16 (no overflow)
        assert abs(value["norm_ratio"] - 1) < RESIDUAL_NORM_RTOL, value
        assert value["rel_diff"] < RESIDUAL_DIFF_RTOL, value


def test_loss_scale_survives_a_checkpoint(dist_results) -> None:
    for value in scenario_values(dist_results, "scaler_checkpoint"):
        assert value["saved"] == value["fresh"] / 2 == value["loaded"], value


def test_fp16_with_powersgd_is_refused(dist_results) -> None:
    for message in scenario_values(dist_results, "fp16_powersgd_refused"):
        assert "train.precision" in message and "powersgd" in message
