"""The Ray cluster launcher configs (infra/aws, infra/gcp): Ray's own schema and validator accept
them, the head is a CPU node that starts Ray and the service with token auth, GPU worker types
scale between their bounds, and the pools their nodes would join cover every example spec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.util import validate_config

from tests.unit.infra.support import INFRA, ROOT, load_yaml, node_type_pools, spec_wants, unsatisfied_examples

CONFIGS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}
# The pools each config promises (infra/README.md lists them).
EXPECTED_POOLS = {
    "aws": {"worker.cpu": "cpu", "worker.gpu-a10g": "gpu-a10g", "worker.gpu-a100": "gpu-a100"},
    "gcp": {"worker.cpu": "cpu", "worker.gpu-l4": "gpu-l4", "worker.gpu-a100": "gpu-a100"},
}
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(params=sorted(CONFIGS))
def cloud(request) -> tuple[str, dict]:
    return request.param, load_yaml(CONFIGS[request.param])


def test_ray_accepts_the_config(cloud):
    name, config = cloud
    jsonschema.validate(config, RAY_SCHEMA)
    validate_config(config)
    assert config["provider"]["type"] == name


def test_ray_schema_is_strict_enough_to_catch_a_typo(cloud):
    """The schema closes node types, so a misspelt key fails (and the test above means something)."""
    _, config = cloud
    config["available_node_types"]["worker.cpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_cpu_head_and_bounded_gpu_workers(cloud):
    _, config = cloud
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2
    for t in gpu_types.values():
        assert t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 60


def test_pools_match_the_types_and_cover_every_example(cloud):
    name, config = cloud
    pools = node_type_pools(config["available_node_types"])
    assert pools == EXPECTED_POOLS[name]
    assert not unsatisfied_examples(pools.values())


def test_pool_check_fails_without_a_cpu_type(cloud):
    """The coverage check bites: with only GPU workers, the CPU demo spec has nowhere to run."""
    _, config = cloud
    pools = node_type_pools(config["available_node_types"])
    assert "demo.yaml" in unsatisfied_examples(p for p in pools.values() if p != "cpu")


def _ray_starts(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_token_auth_on_every_node(cloud):
    _, config = cloud
    starts = _ray_starts(config["head_start_ray_commands"]) + _ray_starts(config["worker_start_ray_commands"])
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command
    # Ray reads the cluster token from ~/.ray/auth_token on every node; it is mounted from the launcher.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_head_starts_the_service_with_both_tokens(cloud):
    _, config = cloud
    (service,) = [c for c in config["head_start_ray_commands"] if "orch up" in c]
    for variable in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)",
                     "ORCH_API_TOKEN=$(cat ~/.orch/api_token)", "RAY_ADDRESS=http://127.0.0.1:8265"):
        assert variable in service
    assert "~/.orch/api_token" in config["file_mounts"]
    # Job folders on the shared mount every node has (setup_commands mount /shared).
    jobs_dir = re.search(r"ORCH_JOBS_DIR=(\S+?);", service).group(1)
    assert jobs_dir.startswith("/shared/")
    assert any("mount" in c and " /shared" in c for c in config["setup_commands"])
    head = _ray_starts(config["head_start_ray_commands"])[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-cpus=0" in head and config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_project_installed_by_make_install_with_the_makefile_torch_pin(cloud):
    _, config = cloud
    setup = " && ".join(config["setup_commands"])
    assert "make install" in setup
    assert config["file_mounts"]["~/moe-orch"] == "."
    assert {".venv", "runs"} <= set(config["rsync_exclude"])
    pin = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install -q {pin} --index-url" in setup


def test_a_spec_spanning_pools_needs_each_of_them():
    spec = {"resources": {"pools": {"gpu-a100": 4, "cuda": 2}}}
    assert spec_wants(spec) == ["gpu-a100", "gpu"]
    assert spec_wants({"resources": {"device": "cuda"}}) == ["gpu"]
    assert spec_wants({}) == ["cpu"]
