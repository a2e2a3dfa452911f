"""The training loop's pure pieces: optimizer contract, schedule, data position across a resize."""

import numpy as np
import pytest
import torch

from workers.compression import CompressionConfig
from workers.config import LoopConfig
from workers.loop import _Position
from workers.moe.model import ModelConfig, MoETransformer
from workers.step import build_optimizer, final_window, lr_at


@pytest.fixture(scope="module")
def model():
    return MoETransformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, n_routed_experts=2, top_k=1, expert_hidden=8))


@pytest.mark.parametrize(
    ("comp", "kind"),
    [
        (CompressionConfig(method="none"), torch.optim.AdamW),
        (CompressionConfig(method="topk"), torch.optim.AdamW),
        (CompressionConfig(method="topk", precondition="adam"), torch.optim.SGD),
        (CompressionConfig(method="topk", momentum=0.9), torch.optim.SGD),
    ],
)
def test_optimizer_follows_the_hook_contract(model, comp, kind):
    opt = build_optimizer(model, LoopConfig(weight_decay=0.1), comp)
    assert type(opt) is kind
    if kind is torch.optim.SGD:  # the hook owns momentum / moments; AdamW's decoupled decay stays
        assert all(g["momentum"] == 0 for g in opt.param_groups)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    matrices = next(g for g in opt.param_groups if g["weight_decay"] == 0.1)["params"]
    assert all(p.dim() >= 2 for p in matrices)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = LoopConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_final_window_is_ten_percent_capped():
    assert [final_window(s) for s in (1, 30, 300, 5000)] == [1, 3, 30, 50]


def test_data_position_is_global_across_a_resize():
    # 2 workers x batch 4 consumed 12 global batches = 96 sequences of the one training order: any
    # world size resumes at sequence 96 (workers/data/order.py).
    pos = _Position.from_meta({"epoch": 1, "sequences_in_epoch": 12 * 2 * 4})
    assert (pos.epoch, pos.sequence) == (1, 96)


def _eval_rows(monkeypatch, units: dict[int, np.ndarray | str], world: int, batch: int, batches: int):
    """Every rank's held-out batches from ``units`` (unit -> rows, or why it is corrupt)."""
    from types import SimpleNamespace

    import workers.loop as loop_module

    monkeypatch.setattr(loop_module, "ray_reads", lambda plan: lambda us: ((i, units[u]) for i, u in enumerate(us)))
    plan, cfg = SimpleNamespace(units=list(units)), LoopConfig(batch_size=batch, eval_batches=batches)
    return [[b[:, 0].tolist() for b in loop_module._eval_batches(plan, r, world, cfg, torch.device("cpu"))]
            for r in range(world)]


def test_every_rank_evaluates_as_many_batches_whatever_the_units(monkeypatch):
    """Expert parallelism runs an all-to-all in every forward, so ranks with unequal held-out batch
    counts would hang (units dealt round-robin gave the 2 ranks 16 and 1 rows here)."""
    import numpy as np

    rows = {u: np.arange(10 * u, 10 * u + n, dtype=np.uint16)[:, None].repeat(3, 1) for u, n in ((0, 7), (1, 1), (2, 9))}
    per_rank = _eval_rows(monkeypatch, rows, world=2, batch=2, batches=3)
    assert [len(b) for b in per_rank] == [3, 3]
    seen = sorted(x for rank in per_rank for b in rank for x in b)
    assert len(seen) == len(set(seen)) == 12  # 3 global batches of 2 x 2 rows, none evaluated twice
    # one small unit still feeds both ranks (smaller batches), and a corrupt one (on_corrupt: skip) is left out
    one = _eval_rows(monkeypatch, {0: "corrupt: row group 0", 1: rows[0]}, world=2, batch=8, batches=2)
    assert [[len(b) for b in r] for r in one] == [[3], [3]]
    assert _eval_rows(monkeypatch, {0: "corrupt"}, world=2, batch=2, batches=2) == [[], []]


@pytest.mark.parametrize(("counts", "base", "ratio"), [((2_000, 500_000), (0, 0), 250.0),
                                                       ((1_000, 250_000), (1_000, 250_000), 250.0),
                                                       ((0, 0), (0, 0), 1.0)])
def test_the_bytes_every_report_carries(tmp_path, counts, base, ratio):
    """One rule for dense / sent in the progress record, each checkpoint's report and the final
    metrics: totals over ranks and attempts (a resume carries the bytes before it); nothing sent (one
    worker: a ring allreduce over one rank sends nothing) is 1x, not a division by 0."""
    from types import SimpleNamespace

    from workers.loop import _Run
    from workers.session import LocalSession

    with LocalSession(tmp_path, 1, lambda m, c: None) as session:  # a one-rank group for the all-reduce
        run = _Run(SimpleNamespace(), SimpleNamespace(byte_counts=lambda: counts), session, placement=None)
        run.base_bytes = torch.tensor(base, dtype=torch.float64)
        sent = run.sent()
    assert sent == {"wire_bytes": counts[0] + base[0], "dense_bytes": counts[1] + base[1], "compression": ratio}
