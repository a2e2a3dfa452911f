"""The distributed scenarios of the compression hooks on 2 gloo ranks (run by test_ddp.py).

They run once, in one pair of spawned processes (gloo over loopback, rendezvous through a FileStore
in a temporary directory), because starting processes that import torch is the slow part; each
scenario records its own result or traceback so that each test fails on its own.
"""

import copy
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from workers import compression
from workers.compression import CommState, CompressionConfig, register, topk_hook

WORLD_SIZE = 2
# A few buckets of ~5k float32 elements for the 2-layer MLP below (~12.5k parameters).
SMALL_BUCKET_CAP_MB = 0.02
SPARSE_DENSITY = 0.01
SPARSE_STEPS = 4
# Above 1 / WORLD_SIZE every bucket falls back to a dense allreduce (float32: 2 * k * 8 >= 2 * n * 4).
FALLBACK_DENSITY = 0.6
# Least squares: 100 full-batch steps at lr 0.05 leave dense within ~1% of its optimum; in a
# single-process simulation of the same problem top-k with EF ends within 0.1% of dense and without
# EF ~70% above it (the ranks' local optima differ, so their top-k entries cancel and the rest is
# never sent), so the bounds below have wide margins.
LSQ_DENSITY = 0.05
LSQ_STEPS = 100
LSQ_LR = 0.05
POWERSGD_STEPS = 4
# The DGC recipe at an extreme ratio on the same least-squares problem: 1 of 256 entries per rank
# and step after a 10-step warm-up from 25%, momentum correction, local clipping, bf16 values.
DGC_DENSITY = 0.004
DGC_WARMUP_STEPS = 10
DGC_STEPS = 150
DGC_LR = 0.005
DGC_CLIP_NORM = 5.0
# precondition: adam on the same least-squares problem, 3 of 256 entries per rank and step, against
# dense AdamW with the same lr and weight decay: measured 16.4 vs 11.7 (ratio 1.40; initial 29.3;
# deterministic full-batch run, exact selection at this size).
ADAM_DENSITY = 0.008
ADAM_STEPS = 150
ADAM_LR = 0.02
ADAM_WD = 0.1
# DESIGN.md's counter example: one 32 x 32 weight (one bucket), k = 11 of 1024 per rank and step.
COUNTER_DENSITY = 0.01
COUNTER_STEPS = 3


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 192), torch.nn.Tanh(), torch.nn.Linear(192, 32))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)  # (b, in), (b, out)


def _against_dense_ddp(rank: int, config: CompressionConfig) -> dict:
    """Three SGD steps with the hook beside plain DDP on the same data: are the gradients equal?"""
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    local = copy.deepcopy(model)
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKET_CAP_MB)
    ddp_ref = DDP(ref, bucket_cap_mb=SMALL_BUCKET_CAP_MB)
    state = register(ddp, config)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ddp_ref.parameters(), lr=0.1)
    equal, max_diff, fallback = [], [], []
    for step in range(3):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        torch.nn.functional.mse_loss(ddp_ref(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        grads_ref = [p.grad for p in ref.parameters()]
        # With N = 2 both sides compute (g0 + g1) / 2 up to an exact power-of-two scaling (DDP
        # multiplies each g by 0.5 before summing, the hook divides the sum by 2) and float addition
        # of two terms is commutative, so equality is exact. With N > 2 the summation order of the
        # ring allreduce and of index_add_ differ and the last bit may not match.
        equal.append(all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True)))
        max_diff.append(max((a - b).abs().max().item() for a, b in zip(grads, grads_ref, strict=True)))
        fallback.append(sorted(state.dense_fallback_buckets))
        if step == 0:
            torch.nn.functional.mse_loss(local(x), y).backward()
            averaged = not all(torch.equal(a, p.grad) for a, p in zip(grads, local.parameters(), strict=True))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    return {
        "equal": equal,
        "max_diff": max_diff,
        "averaged": averaged,
        "params_equal": all(
            torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True)
        ),
        "wire_bytes": state.wire_bytes,
        "dense_bytes": state.dense_bytes,
        "steps": state.steps,
        "fallback": fallback,
        "fallback_calls": state.dense_fallback_calls,
        "bucket_calls": state.bucket_calls,
        "numels": {name: p.numel() for name, p in model.named_parameters()},
    }


def _scenario_exact_at_full_density(rank: int) -> dict:
    """density 1.0 through the sparse path (fallback off) gives DDP's dense gradients bit for bit."""
    return _against_dense_ddp(rank, CompressionConfig(method="topk", density=1.0, dense_fallback=False))


def _scenario_dense_fallback(rank: int) -> dict:
    """density 0.6 at N = 2: sparse would send more than dense, so every bucket all-reduces densely."""
    return _against_dense_ddp(rank, CompressionConfig(method="topk", density=FALLBACK_DENSITY))


def _scenario_sparse(rank: int) -> dict:
    """density 0.01 over several steps: per-bucket non-zeros, byte counters, mass across a rebuild."""
    torch.manual_seed(1)
    model = mlp()
    local = copy.deepcopy(model)
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKET_CAP_MB)
    state = CommState(CompressionConfig(method="topk", density=SPARSE_DENSITY),
                      parameters=dict(model.named_parameters()))
    records: list[dict] = []
    step_box = [0]

    def recording_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        n, index, step = bucket.buffer().numel(), bucket.index(), step_box[0]

        def _record(fut: torch.futures.Future) -> torch.Tensor:
            out = fut.value()  # (n,)
            records.append({"step": step, "index": index, "n": n, "nnz": int(torch.count_nonzero(out))})
            return out

        return topk_hook(state, bucket).then(_record)

    ddp.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    nnz_params = []
    local_sum = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    applied_sum = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for step in range(SPARSE_STEPS):
        step_box[0] = step
        x, y = _batch(rank, step)
        local.load_state_dict(model.state_dict())
        torch.nn.functional.mse_loss(local(x), y).backward()  # this rank's own gradient
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        nnz_params.append(sum(int(torch.count_nonzero(p.grad)) for p in model.parameters()))
        for (name, p), q in zip(model.named_parameters(), local.parameters(), strict=True):
            applied_sum[name] += p.grad
            local_sum[name] += q.grad
            q.grad = None
        opt.step()
        opt.zero_grad()
    # Error feedback conserves mass through DDP's bucket rebuild: what was applied plus the mean
    # residual equals the mean of all local gradients.
    exported = state.export_state()
    mass_err = 0.0
    for name, total in local_sum.items():
        dist.all_reduce(total)
        expected = total / WORLD_SIZE
        got = applied_sum[name] + exported[f"residual/{name}"].view_as(expected)
        mass_err = max(mass_err, ((got - expected).abs().max() / expected.abs().max()).item())
    residuals = state.residuals
    return {
        "records": records,
        "nnz_params": nnz_params,
        "n_params": sum(p.numel() for p in model.parameters()),
        "wire_bytes": state.wire_bytes,
        "dense_bytes": state.dense_bytes,
        "steps": state.steps,
        "bucket_calls": state.bucket_calls,
        "residual_numels": {i: r.numel() for i, r in residuals.items()},
        "residual_nnz": sum(int(torch.count_nonzero(r)) for r in residuals.values()),
        "layout_changes": state.layout_changes,
        "pending": sum(len(p) for p in state._pending.values()),
        "mass_err": mass_err,
    }


def _scenario_singleton_group(rank: int) -> dict:
    """A group of one (passed to register): compression applied, nothing sent."""
    groups = [dist.new_group([r]) for r in range(WORLD_SIZE)]  # every rank creates every group
    torch.manual_seed(2)
    model = mlp()
    local = copy.deepcopy(model)
    ddp = DDP(model, process_group=groups[rank], bucket_cap_mb=SMALL_BUCKET_CAP_MB)
    state = register(ddp, CompressionConfig(method="topk", density=SPARSE_DENSITY), groups[rank])
    x, y = _batch(rank, 0)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    torch.nn.functional.mse_loss(local(x), y).backward()
    # Every entry that arrived is the rank's own gradient there (no residual on the first step).
    agree = all(
        torch.equal(p.grad[p.grad != 0], q.grad[p.grad != 0])
        for p, q in zip(model.parameters(), local.parameters(), strict=True)
    )
    nnz = sum(int(torch.count_nonzero(p.grad)) for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    return {
        "world_size": state.world_size,
        "agree": agree,
        "nnz": nnz,
        "n": n,
        "wire_bytes": state.wire_bytes,
        "dense_bytes": state.dense_bytes,
    }


def _scenario_export(rank: int) -> dict:
    """Two sparse steps with momentum correction, then export_state: the mean over ranks by name."""
    torch.manual_seed(3)
    model = mlp()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKET_CAP_MB)
    state = register(ddp, CompressionConfig(method="topk", density=SPARSE_DENSITY, momentum=0.9))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)  # plain SGD: the hook applies the momentum
    for step in range(2):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    own = state.residual_state()  # this rank's, not averaged
    return {"own": own, "exported": state.export_state(), "after": state.residual_state()}


def _scenario_counters(rank: int) -> dict:
    """DESIGN.md's example: a user registers the hook on their own DDP model and reads the counters."""
    torch.manual_seed(5)
    model = torch.nn.Linear(32, 32, bias=False)
    ddp = DDP(model)
    comm = compression.register(ddp, CompressionConfig(method="topk", density=COUNTER_DENSITY))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    nnz = []
    for step in range(COUNTER_STEPS):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        nnz.append(int(torch.count_nonzero(model.weight.grad)))
        opt.step()
        opt.zero_grad()
    return {"report": comm.report(), "attrs": (comm.wire_bytes, comm.dense_bytes), "n": model.weight.numel(),
            "nnz": nnz}


def _lsq_data() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per-rank least-squares data with different local optima, and a shared initial weight."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 32, generator=gen) for _ in range(WORLD_SIZE)]  # (m, in) per rank
    w_true = [torch.randn(8, 32, generator=gen) for _ in range(WORLD_SIZE)]  # (out, in) per rank
    noise = [0.1 * torch.randn(64, 8, generator=gen) for _ in range(WORLD_SIZE)]  # (m, out) per rank
    ys = [x @ w.T + e for x, w, e in zip(xs, w_true, noise, strict=True)]  # (m, out) per rank
    w0 = torch.randn(8, 32, generator=gen) * 0.1  # (out, in)
    return xs, ys, w0


def _lsq_loss(weight: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Mean over the ranks' data of the least-squares loss of ``weight`` (out, in)."""
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(x @ weight.T, y).item() for x, y in zip(xs, ys, strict=True)) / len(xs)


def _lsq_train(
    rank: int, config: CompressionConfig, make_opt: Callable[[Iterator[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int,
) -> tuple[torch.Tensor, CommState, list[float]]:
    """Full-batch training from ``_lsq_data``'s w0 on this rank's data, under DDP with ``config``'s hook:
    (final weight, hook state, the density the hook used at each step)."""
    xs, ys, w0 = _lsq_data()
    model = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    ddp = DDP(model)
    state = register(ddp, config)
    opt = make_opt(ddp.parameters())
    densities = []
    for _ in range(steps):
        densities.append(state.density)
        torch.nn.functional.mse_loss(ddp(xs[rank]), ys[rank]).backward()
        opt.step()
        opt.zero_grad()
    return model.weight.detach().clone(), state, densities


def _scenario_converge(rank: int) -> dict:
    """Full-batch GD on least squares: dense vs top-k with EF vs top-k without EF."""
    xs, ys, w0 = _lsq_data()
    configs = {
        "dense": CompressionConfig(method="none"),
        "ef": CompressionConfig(method="topk", density=LSQ_DENSITY, error_feedback=True),
        "no_ef": CompressionConfig(method="topk", density=LSQ_DENSITY, error_feedback=False),
    }
    losses, bytes_ = {}, {}
    for name, config in configs.items():
        weight, state, _ = _lsq_train(rank, config, lambda ps: torch.optim.SGD(ps, lr=LSQ_LR), LSQ_STEPS)
        losses[name] = _lsq_loss(weight, xs, ys)
        bytes_[name] = (state.wire_bytes, state.dense_bytes)
    return {"losses": losses, "initial": _lsq_loss(w0, xs, ys), "bytes": bytes_, "n": w0.numel()}


def _scenario_dgc(rank: int) -> dict:
    """Least squares with the DGC recipe vs dense momentum SGD; per-step densities for the byte check."""
    xs, ys, w0 = _lsq_data()
    dgc = CompressionConfig(method="topk", density=DGC_DENSITY, momentum=0.9, warmup_steps=DGC_WARMUP_STEPS,
                            clip_norm=DGC_CLIP_NORM, value_dtype="bfloat16")
    runs = {"dense_momentum": (CompressionConfig(method="none"), 0.9), "dgc": (dgc, 0.0)}
    out: dict = {"initial": _lsq_loss(w0, xs, ys)}
    for name, (config, optimizer_momentum) in runs.items():
        # With momentum correction the optimizer is plain SGD (the hook applies the momentum).
        weight, state, densities = _lsq_train(
            rank, config, lambda ps, m=optimizer_momentum: torch.optim.SGD(ps, lr=DGC_LR, momentum=m), DGC_STEPS)
        out[name] = {"loss": _lsq_loss(weight, xs, ys), "wire_bytes": state.wire_bytes,
                     "dense_bytes": state.dense_bytes, "densities": densities, "weight": weight,
                     "fallback_calls": state.dense_fallback_calls}
    return out


def _scenario_powersgd(rank: int) -> dict:
    """PyTorch's PowerSGD hook under DDP, with our byte counting."""
    torch.manual_seed(4)
    model = mlp()
    ddp = DDP(model)  # one bucket
    state = register(ddp, CompressionConfig(method="powersgd", powersgd_rank=1))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses, wire = [], []
    for _ in range(POWERSGD_STEPS):
        x, y = _batch(rank, 0)  # the same batch: the loss must go down
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        wire.append(state.wire_bytes)
    _, before, after = state.powersgd.compression_stats()
    own, exported = state.residual_state(), state.export_state()
    # Resume (same world size, fresh buckets and PowerSGD state) from the export; a zero gradient and
    # SGD at lr 1 make the first update exactly what the flush applies: the saved mean error.
    resumed = mlp()
    resumed.load_state_dict(model.state_dict())
    ddp2 = DDP(resumed)
    state2 = register(ddp2, CompressionConfig(method="powersgd", powersgd_rank=1))
    state2.import_state(exported)
    before_flush = {name: p.detach().clone() for name, p in resumed.named_parameters()}
    (0.0 * ddp2(_batch(rank, 0)[0]).sum()).backward()
    torch.optim.SGD(ddp2.parameters(), lr=1.0).step()
    flushed = {name: before_flush[name] - p.detach() for name, p in resumed.named_parameters()}
    return {
        "own": own,
        "exported": exported,
        "flushed": flushed,
        "pending_after_flush": sum(len(v) for v in state2._pending.values()),
        "losses": losses,
        "wire": wire,
        "wire_bytes": state.wire_bytes,
        "dense_bytes": state.dense_bytes,
        "numel_after": after,
        "numel_before": before,
        "n": sum(p.numel() for p in model.parameters()),
        "params": [p.detach().clone() for p in model.parameters()],
        "steps": state.steps,
    }


def _scenario_adam(rank: int) -> dict:
    """Least squares: dense AdamW vs precondition adam (top-k of each rank's Adam direction) + plain SGD."""
    xs, ys, w0 = _lsq_data()
    sparse = CompressionConfig(method="topk", density=ADAM_DENSITY, precondition="adam", clip_norm=10.0)
    optimizers = {  # the contract for adam: SGD without momentum, AdamW's weight decay, no global clip
        "dense_adamw": lambda ps: torch.optim.AdamW(ps, lr=ADAM_LR, betas=(0.9, 0.95), weight_decay=ADAM_WD),
        "adam": lambda ps: torch.optim.SGD(ps, lr=ADAM_LR, momentum=0.0, weight_decay=ADAM_WD),
    }
    out: dict = {"initial": _lsq_loss(w0, xs, ys)}
    for name, config in {"dense_adamw": CompressionConfig(method="none"), "adam": sparse}.items():
        weight, state, _ = _lsq_train(rank, config, optimizers[name], ADAM_STEPS)
        out[name] = {"loss": _lsq_loss(weight, xs, ys), "wire_bytes": state.wire_bytes,
                     "dense_bytes": state.dense_bytes, "weight": weight, "fallback_calls": state.dense_fallback_calls}
        if name == "adam":
            out["own"] = state.residual_state()
            out["exported"] = state.export_state()
    return out


SCENARIOS = {
    "exact": _scenario_exact_at_full_density,
    "fallback": _scenario_dense_fallback,
    "sparse": _scenario_sparse,
    "singleton": _scenario_singleton_group,
    "export": _scenario_export,
    "counters": _scenario_counters,
    "converge": _scenario_converge,
    "dgc": _scenario_dgc,
    "powersgd": _scenario_powersgd,
    "adam": _scenario_adam,
}
