"""Device kind -> torch device, collective backend and Ray resources, decided in one place.

The driver picks the backend and the resources each worker asks Ray for from the spec's
``resources.device``; inside a worker, the torch device follows from the accelerator Ray gave it
(Ray sets CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES, so the visible index is always 0).
"""

from __future__ import annotations

import importlib.util

import torch

from workers.config import DeviceKind

# Collective backend per device kind: gloo runs on host memory, nccl on NVIDIA GPUs, hccl on Ascend NPUs.
BACKENDS: dict[str, str] = {"cpu": "gloo", "gpu": "nccl", "npu": "hccl"}


class DeviceUnavailable(RuntimeError):
    """The spec asks for a device kind this machine or cluster cannot provide."""


def backend_for(kind: DeviceKind) -> str:
    return BACKENDS[kind]


def worker_resources(kind: DeviceKind, cpus_per_worker: float) -> dict[str, float]:
    """Ray resources one training worker reserves."""
    resources = {"CPU": cpus_per_worker}
    if kind == "gpu":
        resources["GPU"] = 1
    elif kind == "npu":
        resources["NPU"] = 1
    return resources


def check_available(kind: DeviceKind) -> None:
    """Fail early, in the driver, when the local software cannot drive the device kind at all."""
    if kind == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise DeviceUnavailable("resources.device is 'npu' but torch_npu is not installed")
    if kind == "gpu" and not torch.backends.cuda.is_built():
        raise DeviceUnavailable("resources.device is 'gpu' but this torch build has no CUDA support "
                                "(install the CUDA build of torch: README, 'GPU machines')")


def torch_device(kind: DeviceKind) -> torch.device:
    """The device for this worker process (after Ray has set the visible-device variables)."""
    if kind == "gpu":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("worker was given a GPU but torch.cuda.is_available() is False")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    if kind == "npu":
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)

        torch.npu.set_device(0)
        return torch.device("npu", 0)
    return torch.device("cpu")
