"""The fake multi-node autoscaler config (orchestrator/local/autoscale.py): Ray's own validator accepts it, it
holds every key autoscaler v1 reads without defaults, and infra/local's example is its output."""

from __future__ import annotations

import jsonschema
import pytest
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE as RAY_FAKE_HEAD_TYPE
from ray.autoscaler._private.util import validate_config

from orchestrator.local.autoscale import (
    FAKE_HEAD_NODE_TYPE,
    FakeClusterConfig,
    FakeWorkerType,
    autoscaler_config,
    main,
    write_autoscaler_config,
)
from tests.conftest import ROOT

EXAMPLE = ROOT / "infra" / "local" / "fake-autoscaler.yaml"
# Keys StandardAutoscaler.reset and the fake provider read straight from the file (no defaults are
# merged in for this provider): the list in RAY-2.60-NOTES.md, "Autoscaling".
REQUIRED_KEYS = {
    "cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "auth",
    "upscaling_speed", "idle_timeout_minutes", "docker", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands",
}
PROVIDER_KEYS = {"type", "use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check", "gcs_address"}


def test_default_config_is_complete_and_valid():
    config = autoscaler_config(FakeClusterConfig(gcs_address="10.0.0.5:6380", head_cpus=2))
    validate_config(config)
    assert REQUIRED_KEYS <= config.keys(), REQUIRED_KEYS - config.keys()
    assert PROVIDER_KEYS <= config["provider"].keys()
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["gcs_address"] == "10.0.0.5:6380"
    assert FAKE_HEAD_NODE_TYPE == RAY_FAKE_HEAD_TYPE == config["head_node_type"]
    head = config["available_node_types"][FAKE_HEAD_NODE_TYPE]
    assert head == {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}
    workers = {k: v for k, v in config["available_node_types"].items() if k != FAKE_HEAD_NODE_TYPE}
    assert [(w["resources"], w["min_workers"], w["max_workers"]) for w in workers.values()] == [({"CPU": 1}, 0, 2)]
    assert config["max_workers"] == 2
    assert 0 < config["idle_timeout_minutes"] <= 5


def test_several_worker_types_with_labels():
    cfg = FakeClusterConfig(gcs_address="127.0.0.1:7000", workers=(
        FakeWorkerType(name="small", cpus=1, max_workers=3, labels={"orch.io/pool": "cpu-small"}),
        FakeWorkerType(name="big", cpus=4, min_workers=1, max_workers=1),
    ))
    config = autoscaler_config(cfg)
    assert config["max_workers"] == 4  # validate_config wants it >= the sum of min_workers
    assert config["available_node_types"]["small"]["labels"] == {"orch.io/pool": "cpu-small"}
    assert config["available_node_types"]["big"]["min_workers"] == 1


def test_ray_rejects_what_the_generator_must_never_write():
    """The validator really checks: the schema's integer resources and its closed node-type keys."""
    config = autoscaler_config(FakeClusterConfig(gcs_address="127.0.0.1:7000"))
    config["available_node_types"]["ray.worker.cpu"]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize(("field", "bad"), [
    ("gcs_address", {"gcs_address": "no-port"}),
    ("head_cpus", {"head_cpus": -1}),
    ("idle_timeout_minutes", {"idle_timeout_minutes": 0}),
    ("workers", {"workers": ()}),
    ("workers", {"workers": (FakeWorkerType(name="a"), FakeWorkerType(name="a"))}),
    ("surprise", {"surprise": 1}),
])
def test_bad_settings_are_refused_naming_the_field(field, bad):
    with pytest.raises(ValidationError) as e:
        FakeClusterConfig(**{"gcs_address": "h:1", **bad})
    assert field in str(e.value)


@pytest.mark.parametrize("bad", [{"min_workers": 3, "max_workers": 2}, {"name": FAKE_HEAD_NODE_TYPE},
                                 {"cpus": 0}, {"name": "has space"}])
def test_bad_worker_types_are_refused(bad):
    with pytest.raises(ValidationError):
        FakeWorkerType(**bad)


def test_written_file_round_trips(tmp_path):
    cfg = FakeClusterConfig(gcs_address="127.0.0.1:7000")
    path = write_autoscaler_config(cfg, tmp_path / "sub" / "cfg.yaml")
    assert path.is_absolute()
    assert yaml.safe_load(path.read_text()) == autoscaler_config(cfg)


def test_example_file_is_the_generator_output(tmp_path, capsys):
    """infra/local/fake-autoscaler.yaml is what its header's command writes (so they never drift)."""
    example = yaml.safe_load(EXAMPLE.read_text())
    main(["--gcs-address", example["provider"]["gcs_address"], "--head-cpus",
          str(example["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]["CPU"]),
          "--out", str(tmp_path / "cfg.yaml")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cfg.yaml")
    assert yaml.safe_load((tmp_path / "cfg.yaml").read_text()) == example
    validate_config(example)
