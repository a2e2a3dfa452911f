"""The pool vocabulary (jobs/contracts/pools.py): how a node's pool is derived and what a spec's pool name matches."""

import pytest

from jobs.contracts.pools import check_pool_name, pool_device, pool_of, satisfies


@pytest.mark.parametrize(("resources", "labels", "pool"), [
    ({"CPU": 8}, {}, "cpu"),
    ({"CPU": 8, "GPU": 4}, {"ray.io/accelerator-type": "A100"}, "gpu-a100"),
    ({"CPU": 8, "GPU": 4}, {}, "gpu"),
    ({"CPU": 8, "NPU": 8}, {}, "npu"),
    ({"CPU": 8}, {"orch.io/pool": "cpu-fast"}, "cpu-fast"),
    ({"CPU": 8, "GPU": 1}, {"orch.io/pool": "gpu-spot"}, "gpu-spot"),
    # A label that is not a pool name is ignored rather than inventing a device.
    ({"CPU": 8}, {"orch.io/pool": "Fast Pool"}, "cpu"),
])
def test_pool_of(resources, labels, pool):
    assert pool_of(resources, labels) == pool


def test_bare_kinds_match_every_pool_of_their_kind():
    assert satisfies("gpu-a100", "gpu") and satisfies("gpu-a100", "gpu-a100")
    assert not satisfies("gpu-a100", "gpu-h100") and not satisfies("cpu-fast", "gpu")
    assert pool_device("npu-910b") == "npu"


@pytest.mark.parametrize("name", ["tpu", "GPU", "gpu-", "gpu a100", ""])
def test_bad_pool_names_are_refused(name):
    with pytest.raises(ValueError, match="pool"):
        check_pool_name(name)
