"""Tests for method local (workers/compression/local.py, chunks.py): the payload and its byte
count, exact error-feedback bookkeeping, the config's rules in one process; on 2 gloo ranks: the
``LocalSGD`` wrapper on a plain ``torch.nn.Sequential`` regression against DDP (exact at
local_steps 1 and density 1, close at 8 local steps and 2-bit values for far fewer bytes), and the
product's training step with expert parallelism through a checkpoint (kill and resume).
"""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.support.distributed import results_fixture, scenario_values
from tests.support.expert_parallel import COLLECTIVE_TIMEOUT_S, RANKS_JOIN_TIMEOUT_S, WORLD_SIZE, tiny_config
from workers import checkpoint
from workers.compression import CommState, LocalSGD, chunks
from workers.config import CompressionConfig, LoopConfig
from workers.step import build_step

LOCAL = CompressionConfig(method="local", local_steps=4, density=0.05, value_bits=2, error_decay=0.9)


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
def test_payload_round_trip_and_byte_count(bits: int) -> None:
    acc = torch.randn(3 * chunks.CHUNK_NUMEL, generator=torch.Generator().manual_seed(bits))
    k = chunks.per_chunk(0.01)
    idx, vals = chunks.select(acc, k)
    codes, scale = chunks.quantize(vals, bits)
    payload = chunks.pack(idx, codes, scale, 7.0, bits)
    assert payload.numel() == chunks.payload_bytes(3, k, bits)
    got_idx, got_vals, weight = chunks.unpack(torch.cat([payload.new_zeros(1), payload])[1:], 3, k, bits)  # unaligned
    assert torch.equal(got_idx, idx) and weight == 7.0
    assert torch.equal(got_vals, chunks.dequantize(codes, scale, bits))
    # Round to nearest of 2**bits levels over [-scale, scale]: within half a level.
    bound = 0.0 if bits == 32 else float(scale.max()) / (2**bits - 1) + 1e-6
    assert float((got_vals - vals).abs().max()) <= bound
    # The k largest magnitudes of each chunk.
    kth = acc.view(3, -1).abs().topk(k, dim=1).values[:, -1:]
    assert bool((vals.abs() >= kth).all())


def test_two_bit_payload_is_under_1_9_bytes_per_sent_entry() -> None:
    k = chunks.per_chunk(0.01)  # 41 of 4096
    per_entry = chunks.payload_bytes(100, k, 2) / (100 * k)
    assert 1.75 <= per_entry < 1.9  # 1.5 (12-bit index) + 0.25 (value) + a scale per 41 entries
    # Indices use all 12 bits and survive an odd count.
    idx = torch.tensor([[0, 4095, 2048]])
    codes, scale = chunks.quantize(torch.ones(1, 3), 2)
    got, _, _ = chunks.unpack(chunks.pack(idx, codes, scale, 1.0, 2), 1, 3, 2)
    assert torch.equal(got, idx)


@pytest.mark.parametrize("outer_lr", [0.5, 1.5])
def test_single_rank_sync_keeps_exact_error_bookkeeping(outer_lr: float) -> None:
    """What was not applied of the round's change stays in the accumulator: anchor moved by
    outer_lr * sent (also past the average: 1.5, DESIGN.md), and error' = decay * error + change -
    sent, on one rank (nothing sent)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    cfg = LOCAL.model_copy(update={"outer_lr": outer_lr})
    sync = LocalSGD(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    for _ in range(2):  # two rounds: the second starts from a non-zero accumulator
        anchor, error = sync.anchor.clone(), sync.error.clone()
        for step in range(cfg.local_steps):
            torch.nn.functional.mse_loss(model(torch.randn(8, 64)), torch.randn(8, 1)).backward()
            opt.step()
            opt.zero_grad()
            change = anchor - flat()  # (n,) the round's change so far
            assert sync.step(tokens=8) == (step == cfg.local_steps - 1)
        sent = (anchor - sync.anchor) / cfg.outer_lr  # (n,) what the sync applied
        assert torch.equal(flat(), sync.anchor)
        n = sync.n
        assert 0 < int((sent != 0).sum()) <= sync.chunks * chunks.per_chunk(cfg.density)
        assert sync.error[n:].abs().sum() == 0  # the padding never holds anything
        assert torch.allclose(sync.error[:n] + sent, cfg.error_decay * error[:n] + change, atol=1e-6)
    assert sync.wire_bytes == 0 and sync.dense_bytes == 0 and sync.rounds == 2


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="local_steps: only for method 'local'"):
        CompressionConfig(method="topk", local_steps=4)
    with pytest.raises(ValidationError, match="method 'local' keeps the optimizer"):
        CompressionConfig(method="local", clip_norm=1.0)
    with pytest.raises(ValidationError, match="value_bits"):
        CompressionConfig(method="local", value_bits=3)
    assert CompressionConfig().method == "topk"  # the default is unchanged
    assert not CompressionConfig(method="local").hook_owns_optimizer_state


def test_a_per_step_method_resumes_from_a_local_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    """Switching a job from method local to topk keeps its checkpoint usable: the outer accumulators
    (weight units) are dropped with a warning, the warm-up position is kept; a foreign kind still fails."""
    comm = CommState(CompressionConfig(method="topk"), parameters={"w": torch.zeros(3)})
    saved = LocalSGD({"w": torch.nn.Parameter(torch.ones(3))}, LOCAL).export_state()
    comm.import_state(saved | {"steps": torch.tensor(7)})
    assert comm.steps == 7 and "outer_error tensors dropped" in caplog.text
    with pytest.raises(ValueError, match="unknown compression state key 'moments/w'"):
        comm.import_state({"moments/w": torch.zeros(3)})


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks: the wrapper on a plain torch model against DDP; the training step through a checkpoint

def _regression(rank: int, step: int, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed nonlinear teacher; each rank draws its own half of every step's batch."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(batch, 16, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(16, 32, generator=teacher), torch.randn(32, 1, generator=teacher)
    return x, torch.tanh(x @ w1) @ w2 / 4


def _net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                               torch.nn.GELU(), torch.nn.Linear(256, 1))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int,
           sync: LocalSGD | None = None) -> None:
    for step in range(steps):
        x, y = _regression(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if sync is not None:
            sync.step(tokens=len(x))
    if sync is not None:
        sync.finish_round()


def _eval(model: torch.nn.Module) -> float:
    with torch.no_grad():
        x, y = _regression(99, 10_000, batch=2048)
        return torch.nn.functional.mse_loss(model(x), y).item()


def _scenario_reduces_to_ddp(rank: int) -> dict:
    """local_steps 1, density 1, float32 values, plain SGD: each step's sync is DDP's average."""
    ddp_model, model = DDP(_net()), _net()
    _train(ddp_model, torch.optim.SGD(ddp_model.parameters(), lr=0.05), rank, 10)
    cfg = CompressionConfig(method="local", local_steps=1, density=1.0, value_bits=32, error_decay=1.0)
    sync = LocalSGD(model, cfg)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05), rank, 10, sync)
    diff = max((a - b).abs().max().item() for a, b in zip(ddp_model.module.parameters(), model.parameters(),
                                                            strict=True))
    return {"diff": diff, "rounds": sync.rounds, "wire": sync.wire_bytes, "dense": sync.dense_bytes}


def _scenario_vs_ddp(rank: int) -> dict:
    """8 local steps, 1% per chunk, 2-bit values, AdamW, against DDP AdamW at equal steps."""
    steps, lr = 300, 3e-3
    ddp_model = DDP(_net())
    _train(ddp_model, torch.optim.AdamW(ddp_model.parameters(), lr=lr), rank, steps)
    model = _net()
    cfg = CompressionConfig(method="local", local_steps=8, density=0.01, value_bits=2, error_decay=0.95,
                            warmup_steps=2)
    sync = LocalSGD(model, cfg)
    _train(model, torch.optim.AdamW(model.parameters(), lr=lr), rank, steps, sync)
    flat = sync.anchor.clone()
    both = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    errors = [torch.zeros_like(sync.error) for _ in range(2)]
    dist.all_gather(errors, sync.error.clone())
    saved = sync.export_state()
    mean = torch.cat([saved[f"outer_error/{name}"] for name in sync.params])
    return {"ddp": _eval(ddp_model.module), "local": _eval(model), "init": _eval(_net()),
            "replicas_equal": torch.equal(both[0], both[1]),
            "export_is_mean": torch.allclose(mean, ((errors[0] + errors[1]) / 2)[: sync.n], atol=1e-7),
            "error_nonzero": bool(errors[rank].abs().sum() > 0),
            "wire": sync.wire_bytes, "dense": sync.dense_bytes, "rounds": sync.rounds}


def _scenario_step_resume(rank: int) -> dict:
    """The product's step, EP 2, method local: a run killed after its checkpoint at step 5 and
    resumed from it ends where the uninterrupted run does (each rank sees the same batches, so the
    per-rank state the checkpoint averages or takes from rank 0 is the same on both ranks)."""
    model_cfg = tiny_config(vocab_size=256)
    loop = LoopConfig(steps=9, batch_size=2, lr=1e-2, warmup_steps=2)
    comp = CompressionConfig(method="local", local_steps=3, density=0.05, value_bits=4, warmup_steps=1)
    batches = [torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(s)) for s in range(9)]
    box = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    folder = Path(box[0])

    def run(start: int, stop: int, resume: bool, save_at: int | None):
        s = build_step(model_cfg, comp, loop, expert_parallel=2, seed=0)
        if resume:
            checkpoint.load_model_and_optimizer(folder, model=s.model, optimizer=s.optimizer, groups=s.groups,
                                                device=torch.device("cpu"))
            comm, esync = s.checkpoint_state()
            checkpoint.load_compression(folder, model=s.model, comm=comm, esync=esync, groups=s.groups)
        for step in range(start, stop):
            s(step, batches[step])
            if step + 1 == save_at:
                s.finish_round()
                comm, esync = s.checkpoint_state()
                checkpoint.save(folder, model=s.model, optimizer=s.optimizer, comm=comm, esync=esync,
                                groups=s.groups, meta={"step": save_at}, rank=rank)
        s.finish_round()
        return s

    full = run(0, 9, resume=False, save_at=5)
    saved = torch.load(folder / "compression.pt", weights_only=True) if rank == 0 else {}
    resumed = run(5, 9, resume=True, save_at=None)
    diff = max((a - b).abs().max().item() for a, b in zip(full.model.parameters(), resumed.model.parameters(),
                                                          strict=True))
    dense = [torch.zeros(full.outer.n) for _ in range(2)]
    dist.all_gather(dense, full.outer.anchor.float())
    return {"diff": diff, "dense_replicas_equal": torch.equal(dense[0], dense[1]),
            "saved_kinds": sorted({k.partition("/")[0] for k in saved if "/" in k}),
            "saved_error_nonzero": bool(sum(v.abs().sum() for k, v in saved.items() if "/" in k) > 0),
            "expert_keys_global": any(".experts.w1" in k for k in saved),
            "steps": int(saved["steps"]) if saved else None,
            "bytes": full.byte_counts(), "rounds": full.outer.rounds}


SCENARIOS = {"reduces_to_ddp": _scenario_reduces_to_ddp, "vs_ddp": _scenario_vs_ddp,
             "step_resume": _scenario_step_resume}
dist_results = results_fixture(__name__, WORLD_SIZE, COLLECTIVE_TIMEOUT_S, RANKS_JOIN_TIMEOUT_S)


def test_local_steps_1_at_full_density_is_ddp(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "reduces_to_ddp"):
        assert value["diff"] < 1e-6, value
        assert value["rounds"] == 10
        # density 1 falls back to a dense allreduce of n + 1 floats: the dense figure, plus the weight.
        assert 0 < value["wire"] - value["dense"] <= 10 * 4


def test_wrapper_on_a_plain_model_close_to_ddp_for_far_fewer_bytes(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "vs_ddp"):
        assert value["replicas_equal"] and value["export_is_mean"] and value["error_nonzero"]
        assert value["local"] < 0.2 * value["init"], value  # it learned
        assert value["local"] < 1.5 * value["ddp"], value
        assert value["dense"] / value["wire"] > 50, value
        assert value["rounds"] == 2 + 298 // 8 + 1  # warm-up, full rounds, the closing partial one


def test_training_step_resumes_from_a_checkpoint_exactly(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "step_resume")
    for value in values:
        assert value["diff"] == 0.0, value
        assert value["dense_replicas_equal"]
        wire, dense = value["bytes"]
        assert 0 < wire < dense
    root = values[0]
    assert root["saved_kinds"] == ["outer_error"] and root["saved_error_nonzero"]
    assert root["expert_keys_global"] and root["steps"] == 5
