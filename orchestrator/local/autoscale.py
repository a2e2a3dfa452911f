"""A local autoscaling cluster: the config Ray's autoscaler v1 reads with the fake multi-node provider.

The ``fake_multinode`` provider launches each "node" as real Ray processes (a raylet and its workers)
on this machine, so scale-up from pending demand and scale-down after the idle timeout can be watched
without a cloud. Ray's wheel does not ship the ``example.yaml`` this provider's defaults come from, so
neither ``ray.cluster_utils.AutoscalingCluster`` nor ``prepare_config`` can fill a partial config in;
autoscaler v1 reads the file as written (``StandardAutoscaler.reset``) and checks it with
``validate_config`` only. Hence every key it reads is written here, and the result is validated
before it is written.

Start the head with this file (the monitor it spawns runs the autoscaler and inherits the variables):
``RAY_FAKE_CLUSTER=1 ray start --head --port=<gcs port> --autoscaling-config=<abs path>`` with
``RAY_enable_autoscaler_v2`` unset (v2 with this provider fails in ``fillout_defaults``).
``RAY_FAKE_CLUSTER`` also gives the head the node id the provider expects of it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.contracts.ray_private import node_ip_address

# The fake provider registers the head under this node type (fake_multi_node/node_provider.py,
# FAKE_HEAD_NODE_TYPE); any other name leaves the head without a node type.
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_PROVIDER = "fake_multinode"
# Short enough to watch a scale-down in a test or a demo, long enough that a worker group restarting
# between two attempts of a job does not lose its nodes.
DEFAULT_IDLE_TIMEOUT_MINUTES = 1.0
_NODE_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FakeWorkerType(_Config):
    """One kind of fake node: what it offers Ray and how many of it the autoscaler may hold."""

    name: str = "ray.worker.cpu"
    # Integers: the launcher schema (ray-schema.json) takes whole resource amounts only.
    cpus: int = Field(1, ge=1, le=64)
    min_workers: int = Field(0, ge=0, le=64)
    max_workers: int = Field(2, ge=1, le=64)
    # Ray node labels each node of this type starts with (e.g. {"orch.io/pool": "cpu-small"}).
    labels: dict[str, str] = Field(default_factory=dict)
    # Custom Ray resources each node offers (whole amounts, as the schema wants), e.g. {"drivers": 4}
    # for ORCH_DRIVER_RESOURCES to place job drivers on these nodes.
    resources: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NODE_TYPE_NAME.match(v) or v == FAKE_HEAD_NODE_TYPE:
            raise ValueError(f"worker type name {v!r} must match {_NODE_TYPE_NAME.pattern} "
                             f"and differ from the head's {FAKE_HEAD_NODE_TYPE!r}")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> FakeWorkerType:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})")
        return self


class FakeClusterConfig(_Config):
    """A local autoscaling cluster: the running head's GCS, its CPUs, and the worker types to add."""

    cluster_name: str = Field("orch-local", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    # host:port of the head's GCS (``ray start --head --port``); fake nodes join it. Without it the
    # provider assumes <this machine's IP>:6379, which is another cluster's port on a shared machine.
    gcs_address: str
    # The head's logical CPUs, as ``ray start --head --num-cpus`` gives them.
    head_cpus: int = Field(0, ge=0, le=1024)
    workers: tuple[FakeWorkerType, ...] = (FakeWorkerType(),)
    idle_timeout_minutes: float = Field(DEFAULT_IDLE_TIMEOUT_MINUTES, gt=0.0, le=24 * 60.0)
    # Nodes launched at once = upscaling_speed x running nodes (at least one).
    upscaling_speed: float = Field(1.0, gt=0.0, le=1000.0)

    @field_validator("gcs_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _HOST_PORT.match(v):
            raise ValueError(f"gcs_address {v!r} must be host:port (the head's `ray start --port`)")
        return v

    @field_validator("workers")
    @classmethod
    def _distinct(cls, v: tuple[FakeWorkerType, ...]) -> tuple[FakeWorkerType, ...]:
        names = [w.name for w in v]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"workers must be non-empty with distinct names, got {names}")
        return v


class FakeNodes(_Config):
    """What `orch up --autoscale-config FILE` reads (YAML): the worker types and the autoscaler's pace;
    the head's address and CPUs come from the head `orch up` starts."""

    workers: tuple[FakeWorkerType, ...] = (FakeWorkerType(),)
    idle_timeout_minutes: float = Field(DEFAULT_IDLE_TIMEOUT_MINUTES, gt=0.0, le=24 * 60.0)
    upscaling_speed: float = Field(1.0, gt=0.0, le=1000.0)

    def cluster(self, gcs_address: str, head_cpus: int) -> FakeClusterConfig:
        return FakeClusterConfig(gcs_address=gcs_address, head_cpus=head_cpus, workers=self.workers,
                                 idle_timeout_minutes=self.idle_timeout_minutes, upscaling_speed=self.upscaling_speed)

    def max_extra(self) -> dict[str, dict[str, float]]:
        """Per pool, what the autoscaler may add at most (``ORCH_AUTOSCALER_MAX_EXTRA``): the
        scheduler refuses only jobs larger than the nodes plus this."""
        from jobs.contracts.pools import pool_of

        extra: dict[str, dict[str, float]] = {}
        for w in self.workers:
            pool = extra.setdefault(pool_of({"CPU": w.cpus}, w.labels), {})
            for name, amount in {"CPU": w.cpus, **w.resources}.items():
                pool[name] = pool.get(name, 0.0) + float(amount * w.max_workers)
        return extra


def autoscaler_config(cfg: FakeClusterConfig) -> dict[str, Any]:
    """The complete autoscaler v1 config for ``cfg``, validated by Ray's own ``validate_config``."""
    from ray.autoscaler._private.util import validate_config

    node_types: dict[str, Any] = {
        FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": cfg.head_cpus}, "node_config": {}, "max_workers": 0},
    }
    for w in cfg.workers:
        node_types[w.name] = {
            "resources": {"CPU": w.cpus, **w.resources},
            "labels": dict(w.labels),
            "node_config": {},
            "min_workers": w.min_workers,
            "max_workers": w.max_workers,
        }
    config: dict[str, Any] = {
        "cluster_name": cfg.cluster_name,
        "max_workers": sum(w.max_workers for w in cfg.workers),
        "upscaling_speed": cfg.upscaling_speed,
        "idle_timeout_minutes": cfg.idle_timeout_minutes,
        "provider": {
            "type": FAKE_PROVIDER,
            # Fake nodes have no IP of their own; the autoscaler matches them to Ray nodes by id.
            "use_node_id_as_ip": True,
            # Nothing to ssh into or set up: the provider starts the Ray processes itself.
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": cfg.gcs_address,
        },
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    validate_config(config)
    return config


def write_autoscaler_config(cfg: FakeClusterConfig, path: Path) -> Path:
    """Write ``autoscaler_config(cfg)`` as YAML to ``path`` (absolute: the monitor reads it from its
    own working directory) and return that path."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(autoscaler_config(cfg), sort_keys=False))
    return path


def local_gcs_address(port: int) -> str:
    """The address a head started on this machine with ``--port`` listens at: the IP Ray picks for
    this node (the fake provider's own default host), not 127.0.0.1."""
    return f"{node_ip_address()}:{port}"


def main(argv: list[str] | None = None) -> None:
    """``python -m orchestrator.local.autoscale --gcs-address HOST:PORT --head-cpus N --out FILE``: one worker
    type of 1 CPU, 0 to 2 nodes (infra/local/fake-autoscaler.yaml is this with the defaults)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.local.autoscale", description=main.__doc__)
    parser.add_argument("--gcs-address", required=True, help="host:port of the running head's GCS")
    parser.add_argument("--head-cpus", type=int, default=0, help="the head's --num-cpus")
    parser.add_argument("--out", type=Path, required=True, help="where to write the YAML")
    args = parser.parse_args(argv)
    cfg = FakeClusterConfig(gcs_address=args.gcs_address, head_cpus=args.head_cpus)
    print(write_autoscaler_config(cfg, args.out))


if __name__ == "__main__":
    main()
