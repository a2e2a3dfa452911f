"""The compression hooks under DDP on 2 gloo ranks (scenarios in scenarios.py, run once per
module): exact at full density, dense fallback, sparse bytes, export by name, convergence with error
feedback, the DGC recipe, PowerSGD and Adam preconditioning.
"""

import math

import pytest
import torch

from tests.support.distributed import results_fixture, scenario_values
from tests.unit.workers.compression.fakes import FakeBucket, SoloState
from tests.unit.workers.compression.scenarios import (
    ADAM_DENSITY,
    ADAM_STEPS,
    COUNTER_DENSITY,
    COUNTER_STEPS,
    DGC_DENSITY,
    DGC_STEPS,
    DGC_WARMUP_STEPS,
    FALLBACK_DENSITY,
    LSQ_DENSITY,
    LSQ_STEPS,
    POWERSGD_STEPS,
    SPARSE_STEPS,
    WORLD_SIZE,
    mlp,
)
from workers.compression import CompressionConfig, num_selected, scheduled_density, sparse_pays, topk_hook

SCENARIO_MODULE = "tests.unit.workers.compression.scenarios"


# Collectives fail instead of hanging past this; the parent kills the ranks after its own limit.
COLLECTIVE_TIMEOUT_S = 30
RANKS_JOIN_TIMEOUT_S = 120
LSQ_EF_MAX_RATIO = 1.03
LSQ_NO_EF_MIN_RATIO = 1.3
DGC_MAX_LOSS_RATIO = 1.3
ADAM_MAX_LOSS_RATIO = 1.5


dist_results = results_fixture(SCENARIO_MODULE, WORLD_SIZE, COLLECTIVE_TIMEOUT_S, RANKS_JOIN_TIMEOUT_S)


@pytest.mark.timeout(300)
def test_full_density_matches_dense_ddp_exactly(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "exact"):
        assert value["averaged"], "hook output equals the local gradient: nothing was averaged"
        assert value["equal"] == [True, True, True], value["max_diff"]
        assert value["params_equal"]
        assert value["steps"] == 3
        # density 1.0 sends (index, value) pairs: twice the bytes of the dense allreduce at N = 2.
        assert value["wire_bytes"] == 2 * value["dense_bytes"] > 0
        assert value["fallback"] == [[], [], []] and value["fallback_calls"] == 0


@pytest.mark.timeout(300)
def test_dense_fallback_when_sparse_would_not_be_smaller(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "fallback"):
        # sparse_pays says no for every bucket at density 0.6, N = 2 (checked with the bucket sizes
        # DDP used: before and after its rebuild, all parameters together are ~12.5k elements).
        n = sum(value["numels"].values())
        assert not sparse_pays(n, num_selected(n, FALLBACK_DENSITY), 4, 4, WORLD_SIZE)
        assert value["fallback_calls"] == value["bucket_calls"] > 0
        assert all(len(buckets) >= 1 for buckets in value["fallback"])
        # ... and then the result is DDP's dense allreduce, bit for bit, over all three steps.
        assert value["averaged"]
        assert value["equal"] == [True, True, True], value["max_diff"]
        assert value["params_equal"]
        assert value["wire_bytes"] == value["dense_bytes"] > 0


@pytest.mark.timeout(300)
def test_sparse_nonzeros_and_byte_model(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "sparse")
    for value in values:
        records = value["records"]
        assert value["steps"] == SPARSE_STEPS
        assert value["bucket_calls"] == len(records)
        assert len({r["index"] for r in records}) >= 2, "expected several buckets"
        assert sum(r["n"] for r in records) == SPARSE_STEPS * value["n_params"]
        dense = wire = 0
        for r in records:
            k = max(1, math.ceil(r["n"] / 100))  # density 0.01 in integers
            assert 0 < r["nnz"] <= WORLD_SIZE * k, r
            dense += 2 * (WORLD_SIZE - 1) * r["n"] * 4 // WORLD_SIZE  # float32 ring allreduce
            wire += (WORLD_SIZE - 1) * 2 * k * 4  # int32 index + float32 value per pair
        assert (value["dense_bytes"], value["wire_bytes"]) == (dense, wire)
        assert value["dense_bytes"] / value["wire_bytes"] >= 40
        # The applied gradient is as sparse as what the buckets returned.
        for step in range(SPARSE_STEPS):
            assert value["nnz_params"][step] == sum(r["nnz"] for r in records if r["step"] == step)
        # DDP rebuilds its buckets after the first iteration (here 1 bucket -> 2): the residual of a
        # bucket whose layout changed goes back to per-name tensors once per change, and no more ...
        last_n: dict[int, int] = {}
        changes = 0
        for r in records:
            changes += r["index"] in last_n and last_n[r["index"]] != r["n"]
            last_n[r["index"]] = r["n"]
        assert value["layout_changes"] == changes >= 1
        # ... and all of it lands in the new buckets: one residual slot per parameter element.
        assert value["pending"] == 0
        assert sum(value["residual_numels"].values()) == value["n_params"]
        assert value["residual_nnz"] > 0.9 * value["n_params"]
        # Nothing was lost across the rebuild: applied + mean residual == mean of local gradients.
        assert value["mass_err"] < 1e-5
    # All ranks apply the same averaged gradient, so they agree on what arrived.
    assert values[0]["nnz_params"] == values[1]["nnz_params"]


@pytest.mark.timeout(300)
def test_group_of_one_compresses_without_sending(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "singleton"):
        assert value["world_size"] == 1
        assert (value["wire_bytes"], value["dense_bytes"]) == (0, 0)
        assert value["agree"]
        assert 0 < value["nnz"] < 0.02 * value["n"]


@pytest.mark.timeout(300)
def test_export_state_is_mean_by_name_and_resizes_without_losing_mass(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "export")
    exported = [v["exported"] for v in values]
    # The same dict on every rank ...
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])
    names = [name for name, _ in mlp().named_parameters()]
    assert set(exported[0]) == {"steps"} | {f"{kind}/{name}" for kind in ("residual", "velocity") for name in names}
    assert int(exported[0]["steps"]) == 2
    # ... holding the mean over the two ranks of each rank's own residual and velocity; exporting
    # changed nothing locally.
    own = [v["own"] for v in values]
    for key, mean in exported[0].items():
        if key != "steps":
            assert torch.allclose(mean, (own[0][key] + own[1][key]) / 2, rtol=0, atol=1e-7), key
            assert torch.count_nonzero(mean) > 0.9 * mean.numel(), key
    assert all(torch.equal(v["own"][key], v["after"][key]) for v in values for key in v["own"])

    # Resize N = 2 -> M = 1: import into a group of one whose bucket holds the parameters in another
    # order. A zero gradient at density 1 flushes the state: with momentum m the update is
    # v + m * u of the mean, exactly what the mean over the two old ranks of (v + m * u) would be.
    model = mlp()
    params = dict(model.named_parameters())
    order = names[::-1]
    n = sum(p.numel() for p in params.values())
    state = SoloState(CompressionConfig(density=1.0, momentum=0.9), parameters=params)
    state.import_state(exported[0])
    assert state.steps == 2
    out = topk_hook(state, FakeBucket(0, [params[name] for name in order], torch.zeros(n))).wait()  # (n,)
    parts = dict(zip(order, out.split([params[name].numel() for name in order]), strict=True))
    for name in names:
        expected = sum(own_r[f"residual/{name}"] + 0.9 * own_r[f"velocity/{name}"] for own_r in own) / 2
        assert torch.allclose(parts[name], expected, rtol=0, atol=1e-6), name


@pytest.mark.timeout(300)
def test_register_on_plain_ddp_exposes_byte_counters(dist_results: list[dict]) -> None:
    for value in scenario_values(dist_results, "counters"):
        n = value["n"]
        k = math.ceil(COUNTER_DENSITY * n)
        report = value["report"]
        assert report["steps"] == COUNTER_STEPS and report["density"] == COUNTER_DENSITY
        # The byte model by hand: int32 index + float32 value per pair, float32 ring allreduce.
        assert report["wire_bytes"] == COUNTER_STEPS * (WORLD_SIZE - 1) * k * 8
        assert report["dense_bytes"] == COUNTER_STEPS * 2 * (WORLD_SIZE - 1) * n * 4 // WORLD_SIZE
        assert value["attrs"] == (report["wire_bytes"], report["dense_bytes"])
        assert report["dense_fallback_buckets"] == [] and report["dense_fallback_calls"] == 0
        # The hook really ran: what arrived holds at most the two ranks' k entries each.
        assert all(0 < nnz <= WORLD_SIZE * k for nnz in value["nnz"])


@pytest.mark.timeout(300)
def test_error_feedback_makes_sparse_sgd_converge(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "converge")
    assert values[0]["losses"] == values[1]["losses"], "ranks must hold the same model"
    losses, initial = values[0]["losses"], values[0]["initial"]
    assert losses["dense"] < 0.6 * initial
    assert losses["ef"] <= LSQ_EF_MAX_RATIO * losses["dense"], losses
    assert losses["no_ef"] >= LSQ_NO_EF_MIN_RATIO * losses["dense"], losses
    n = values[0]["n"]
    wire, dense = values[0]["bytes"]["dense"]
    assert wire == dense == LSQ_STEPS * n * 4
    wire, dense = values[0]["bytes"]["ef"]
    assert wire == LSQ_STEPS * 2 * num_selected(n, LSQ_DENSITY) * 4 and dense == LSQ_STEPS * n * 4


@pytest.mark.timeout(300)
def test_dgc_recipe_trains_at_extreme_ratio_with_exact_byte_count(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "dgc")
    assert torch.equal(values[0]["dgc"]["weight"], values[1]["dgc"]["weight"]), "ranks must hold the same model"
    dense, dgc = values[0]["dense_momentum"], values[0]["dgc"]
    n = dense["weight"].numel()
    # The warm-up: 25% at step 0, exponentially down to the density after DGC_WARMUP_STEPS.
    expected = [scheduled_density(t, DGC_DENSITY, DGC_WARMUP_STEPS, 0.25) for t in range(DGC_STEPS)]
    assert dgc["densities"] == expected and expected[0] == 0.25 and expected[-1] == DGC_DENSITY
    # bf16 values: 6 bytes per pair; sparse always pays here (2 * 64 * 6 < 2 * 256 * 4), no fallback.
    assert dgc["fallback_calls"] == 0
    assert dgc["wire_bytes"] == sum((WORLD_SIZE - 1) * num_selected(n, d) * 6 for d in expected)
    assert dgc["dense_bytes"] == dense["wire_bytes"] == DGC_STEPS * n * 4
    assert dgc["dense_bytes"] / dgc["wire_bytes"] > 50  # warm-up included; 1 / (0.004 * 6 / 4) after it
    # It trains: at 150 steps dense momentum SGD is at 0.43 of the initial loss and DGC at 0.50
    # (deterministic full-batch run; exact selection at this size).
    initial = values[0]["initial"]
    assert dense["loss"] < 0.5 * initial
    assert dgc["loss"] < 0.6 * initial
    assert dgc["loss"] <= DGC_MAX_LOSS_RATIO * dense["loss"], (dgc["loss"], dense["loss"])


@pytest.mark.timeout(300)
def test_powersgd_runs_under_ddp_and_sends_less_than_dense(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "powersgd")
    for value in values:
        assert value["steps"] == POWERSGD_STEPS
        n = value["n"]
        dense_step = 2 * (WORLD_SIZE - 1) * n * 4 // WORLD_SIZE
        assert value["dense_bytes"] == POWERSGD_STEPS * dense_step
        # Two dense warm-up steps, then per step allreduces of (uncompressed, P, Q) elements: the same
        # element counts PowerSGD's own compression_stats adds up.
        compressed_steps = POWERSGD_STEPS - 2
        assert value["numel_before"] == compressed_steps * n
        assert value["wire"][1] == 2 * dense_step
        assert value["wire_bytes"] == 2 * dense_step + 2 * (WORLD_SIZE - 1) * value["numel_after"] * 4 // WORLD_SIZE
        assert value["wire_bytes"] < 0.6 * value["dense_bytes"]
        assert value["wire"][-1] - value["wire"][-2] < 0.1 * dense_step
        assert value["losses"][-1] < value["losses"][0]
    assert all(torch.equal(a, b) for a, b in zip(values[0]["params"], values[1]["params"], strict=True))


@pytest.mark.timeout(300)
def test_powersgd_error_memory_is_exported_by_name_and_flushed_on_resume(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "powersgd")
    params = dict(mlp().named_parameters())
    names = list(params)
    exported = values[0]["exported"]
    assert set(exported) == {"steps"} | {f"residual/{name}" for name in names}
    assert all(torch.equal(exported[key], values[1]["exported"][key]) for key in exported)
    for name in names:
        key = f"residual/{name}"
        own = [v["own"][key] for v in values]
        # PowerSGD's error memory differs by rank (each rank's gradient minus the shared approximation).
        assert not torch.allclose(own[0], own[1])
        assert torch.allclose(exported[key], (own[0] + own[1]) / 2, rtol=0, atol=1e-7), key
        if params[name].dim() == 2:  # compressed; 1-d tensors are all-reduced as they are
            assert torch.count_nonzero(exported[key]) > 0.5 * exported[key].numel(), key
        # Resumed: the first update (dense, PowerSGD starts at its third iteration) applies the saved mean.
        for value in values:
            assert torch.allclose(value["flushed"][name].reshape(-1), exported[key], rtol=0, atol=1e-6), name
    assert all(v["pending_after_flush"] == 0 for v in values)


@pytest.mark.timeout(300)
def test_adam_precondition_trains_like_adamw_with_exact_bytes_and_mean_export(dist_results: list[dict]) -> None:
    values = scenario_values(dist_results, "adam")
    assert torch.equal(values[0]["adam"]["weight"], values[1]["adam"]["weight"]), "ranks must hold the same model"
    dense, adam = values[0]["dense_adamw"], values[0]["adam"]
    n = dense["weight"].numel()
    assert adam["fallback_calls"] == 0
    assert adam["wire_bytes"] == ADAM_STEPS * (WORLD_SIZE - 1) * num_selected(n, ADAM_DENSITY) * 8
    assert adam["dense_bytes"] == dense["wire_bytes"] == ADAM_STEPS * n * 4
    initial = values[0]["initial"]
    assert dense["loss"] < 0.5 * initial
    assert adam["loss"] <= ADAM_MAX_LOSS_RATIO * dense["loss"], (adam["loss"], dense["loss"])
    # Export: every rank the same dict, the mean over ranks of residual and both moments, by name.
    exported = [v["exported"] for v in values]
    assert set(exported[0]) == {"steps"} | {f"{kind}/weight" for kind in ("residual", "exp_avg", "exp_avg_sq")}
    assert int(exported[0]["steps"]) == ADAM_STEPS
    for key in exported[0]:
        assert torch.equal(exported[0][key], exported[1][key]), key
        if key != "steps":
            mean = (values[0]["own"][key] + values[1]["own"][key]) / 2
            assert torch.allclose(exported[0][key], mean, rtol=0, atol=1e-7), key
            assert not torch.equal(values[0]["own"][key], values[1]["own"][key]), key  # per-rank state
