"""Spec validation: every bad field is named, overrides reach any field, the demo spec is valid."""

from pathlib import Path

import pytest

from jobs.specs.base import SpecError
from jobs.specs.train import load_spec, validate_spec

DEMO = Path(__file__).resolve().parents[3] / "jobs" / "examples" / "demo.yaml"


def test_demo_spec_is_valid():
    spec = load_spec(DEMO)
    assert spec.resources.num_workers == 2
    # The demo's default is the setting that met the slow-link goal (BENCHMARKS.md, "Local steps").
    assert (spec.compression.method, spec.compression.local_steps, spec.compression.density,
            spec.compression.value_bits, spec.compression.outer_lr) == ("local", 4, 0.03, 4, 1.5)
    assert spec.train.grad_clip == 1.0


@pytest.mark.parametrize(
    ("raw", "field", "why"),
    [
        ({"train": {"steps": "many"}}, "train.steps", "valid integer"),
        ({"compression": {"density": 1.5}}, "compression.density", "less than or equal to 1"),
        ({"compression": {"density": 0}}, "compression.density", "greater than 0"),
        ({"compression": {"method": "gzip"}}, "compression.method", "'powersgd' or 'local'"),
        ({"model": {"n_experts": 8}}, "model.n_experts", "unknown field"),
        ({"trainer": {}}, "trainer", "unknown field"),
        ({"resources": {"device": "tpu"}}, "resources.device", "'cpu', 'gpu' or 'npu'"),
        ({"train": {"precision": "fp8"}}, "train.precision", "'fp32', 'bf16' or 'fp16'"),
        ({"model": {"top_k": 9, "n_routed_experts": 8}}, "top_k", "n_routed_experts"),
        ({"model": {"max_seq_len": 64}, "data": {"seq_len": 128}}, "model.max_seq_len", "data.seq_len"),
    ],
)
def test_bad_field_is_named(raw, field, why):
    with pytest.raises(SpecError) as err:
        validate_spec(raw)
    assert field in str(err.value) and why in str(err.value)


def test_set_overrides_nested_fields_with_yaml_values():
    spec = validate_spec({}, ["train.steps=7", "compression.error_feedback=false", "model.capacity_factor=null",
                              "data.extensions=[.py, .md]"])
    assert spec.train.steps == 7
    assert spec.compression.error_feedback is False
    assert spec.model.capacity_factor is None
    assert spec.data.extensions == (".py", ".md")


@pytest.mark.parametrize("assignment", ["train.steps", "=3", "train.steps.deeper=1"])
def test_bad_override_is_an_error(assignment):
    with pytest.raises(SpecError):
        validate_spec({"train": {"steps": 5}}, [assignment])


def test_unparsable_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(SpecError, match="bad.yaml is not valid YAML"):
        load_spec(bad)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_expert_parallel_must_divide_workers_and_experts():
    with pytest.raises(SpecError, match="resources.expert_parallel"):
        validate_spec({"resources": {"num_workers": 2, "expert_parallel": 3}})
    assert validate_spec({"resources": {"num_workers": 4, "expert_parallel": 2}}).resources.expert_parallel == 2


@pytest.mark.parametrize("word, kind", [("cpu", "cpu"), ("gpu", "gpu"), ("npu", "npu"), ("cuda", "gpu")])
def test_device_vocabulary_with_cuda_alias(word, kind):
    """One vocabulary (cpu | gpu | npu) for specs and node pools; specs written with 'cuda' still parse."""
    spec = validate_spec({"resources": {"device": word}})
    assert spec.resources.device == kind
    assert spec.model_dump()["resources"]["device"] == kind  # what the controller stores and workers get


def test_pools_span_kinds_and_give_num_workers_and_device():
    spec = validate_spec({"resources": {"pools": {"gpu": 2, "cpu-a": 4}}})
    assert spec.resources.worker_pools() == {"gpu": 2, "cpu-a": 4}
    assert (spec.resources.num_workers, spec.resources.device, spec.resources.mixed_devices) == (6, "gpu", True)
    assert validate_spec({}).resources.worker_pools() == {"cpu": 2}
    assert validate_spec(spec.model_dump()).resources == spec.resources  # a stored spec validates again


@pytest.mark.parametrize(
    ("resources", "why"),
    [
        ({"pools": {"gpu": 1}, "num_workers": 3}, "pools and num_workers are mutually exclusive"),
        ({"pools": {"gpu": 1, "cpu": 1}, "device": "cpu"}, "pools and device are mutually exclusive"),
        ({"pools": {"tpu-x": 1}}, "resources.pools.tpu-x"),
        ({"pools": {"gpu": 0}}, "resources.pools.gpu"),
        ({"pools": {"gpu": 1, "npu": 1}}, "one accelerator device per job"),
    ],
)
def test_bad_pools_are_named(resources, why):
    with pytest.raises(SpecError, match=why):
        validate_spec({"resources": resources})


def test_fp16_with_powersgd_is_refused_before_any_work():
    with pytest.raises(SpecError, match="train.precision 'fp16' cannot run with compression.method 'powersgd'"):
        validate_spec({"train": {"precision": "fp16"}, "compression": {"method": "powersgd"}})


def test_elastic_size_is_a_min_max_pair_that_demand_counts_at_its_max():
    from jobs.contracts.demand import job_demand
    from jobs.contracts.elastic import size_bounds

    spec = validate_spec({"resources": {"num_workers": [2, 6], "expert_parallel": 2}}, ["resources.max_failures=3"])
    res = spec.resources
    assert (res.num_workers, res.elastic, res.min_workers, res.max_workers) == ((2, 6), True, 2, 6)
    assert res.worker_pools() == {"cpu": 6}  # Ray Train's elastic policy asks for the max
    assert job_demand(spec)["cpu"]["CPU"] == 6 * res.cpus_per_worker + 1.0  # + Ray Data's task
    assert size_bounds(spec) == (2, 6)
    stored = spec.model_dump(mode="json")  # what the control plane stores and sends back
    assert stored["resources"]["num_workers"] == [2, 6] and validate_spec(stored).resources == res
    assert validate_spec({}, ["resources.num_workers=[1, 2]"]).resources.num_workers == (1, 2)  # --set


def test_fixed_size_stays_an_int():
    res = validate_spec({"resources": {"num_workers": 3}}).resources
    assert (res.num_workers, res.elastic, res.min_workers, res.max_workers) == (3, False, 3, 3)
    assert res.worker_pools() == {"cpu": 3}
    assert validate_spec({}).resources.model_dump()["num_workers"] == 2


def test_failure_and_preemption_defaults_survive_node_loss():
    res = validate_spec({}).resources
    assert res.max_failures >= 1  # Ray's 0 would end the run at the first lost node
    assert (res.max_preemption_failures, res.preemption_check_every) == (10, 5)
    assert res.elastic_resize_monitor_interval_s == 60.0  # Ray's default


@pytest.mark.parametrize(
    ("resources", "field", "why"),
    [
        ({"num_workers": [3, 2]}, "resources.num_workers", "min <= max, got [3, 2]"),
        ({"num_workers": [0, 2]}, "resources.num_workers.elastic.0", "greater than or equal to 1"),
        ({"num_workers": [1, 2, 3]}, "resources.num_workers.elastic", "at most 2 items"),
        ({"num_workers": "two"}, "resources.num_workers.fixed", "valid integer"),
        ({"num_workers": [2, 3], "expert_parallel": 2}, "resources.num_workers ([2, 3]", "expert_parallel (2) must divide"),
        ({"num_workers": [1, 2], "pools": {"cpu-a": 1}}, "resources", "pools cannot run with an elastic num_workers"),
        ({"max_preemption_failures": -2}, "resources.max_preemption_failures", "greater than or equal to -1"),
        ({"preemption_check_every": -1}, "resources.preemption_check_every", "greater than or equal to 0"),
        ({"elastic_resize_monitor_interval_s": 0}, "resources.elastic_resize_monitor_interval_s", "greater than or equal to 1"),
    ],
)
def test_bad_elastic_and_failure_fields_are_named(resources, field, why):
    with pytest.raises(SpecError) as err:
        validate_spec({"resources": resources})
    assert field in str(err.value) and why in str(err.value)
