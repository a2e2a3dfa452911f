"""Pool names: the one vocabulary the scheduler, the specs and the trainer share (torch- and ray-free).

A pool is a set of Ray nodes that give the same device. Nothing is configured in the service:
a node's pool comes from what Ray already knows of it.

- a node labelled ``orch.io/pool=<name>`` (``ray start --labels``, a KubeRay group's ``rayStartParams``)
  is in that pool; the name's prefix says its device (``cpu-fast`` is a cpu pool);
- otherwise a node with GPUs is in ``gpu-<accelerator type>`` (Ray's ``ray.io/accelerator-type`` label,
  lower-cased: ``gpu-a100``), or ``gpu`` when Ray knows no type; a node with Ray's ``NPU`` resource is in
  ``npu``; every other node is in ``cpu``.

A spec names either an exact pool (``gpu-a100``) or a bare device (``gpu``), which any pool of that device
satisfies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from workers.config import DEVICES

POOL_LABEL = "orch.io/pool"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
POOL_NAME_PATTERN = r"^(cpu|gpu|npu)(-[a-z0-9][a-z0-9_.-]{0,47})?$"
_POOL_NAME = re.compile(POOL_NAME_PATTERN)
# The Ray resource a worker of each device reserves one of, beside its CPUs.
DEVICE_RESOURCE: dict[str, str | None] = {"cpu": None, "gpu": "GPU", "npu": "NPU"}


def check_pool_name(name: str) -> str:
    if not _POOL_NAME.match(name):
        raise ValueError(f"pool {name!r} must be cpu, gpu or npu, optionally followed by -<name> (e.g. gpu-a100)")
    return name


def pool_device(name: str) -> str:
    """``gpu-a100`` -> ``gpu``."""
    device = check_pool_name(name).split("-", 1)[0]
    assert device in DEVICES
    return device


def pool_of(resources: Mapping[str, float], labels: Mapping[str, str]) -> str:
    """The pool of a node from its Ray resources and labels (see the module docstring)."""
    labelled = labels.get(POOL_LABEL)
    if labelled and _POOL_NAME.match(labelled):
        return labelled
    if resources.get("GPU", 0) > 0:
        accelerator = labels.get(ACCELERATOR_LABEL)
        return f"gpu-{accelerator.lower()}" if accelerator and _POOL_NAME.match(f"gpu-{accelerator.lower()}") else "gpu"
    if resources.get("NPU", 0) > 0:
        return "npu"
    return "cpu"


def satisfies(node_pool: str, wanted: str) -> bool:
    """Whether a node of ``node_pool`` can hold a worker that asks for ``wanted`` (a pool or a bare device)."""
    return node_pool == wanted or (wanted in DEVICES and pool_device(node_pool) == wanted)
