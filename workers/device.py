"""Device device -> torch device, collective backend and Ray resources, decided in one place.

The driver picks the backend and the resources each worker asks Ray for from the spec's
``resources.device``; inside a worker, the torch device follows from the accelerator Ray gave it
(Ray sets CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES, so the visible index is always 0).

``train.precision`` (fp32 | bf16 | fp16) becomes an autocast context and, for fp16, a GradScaler,
both keyed by the torch device's type (cpu, cuda, npu), so one code path serves every device. torch
2.13 autocasts to float16 on CPU too and its GradScaler runs there, so fp16 is allowed on every device,
but on CPU it only checks the fp16 path: without native fp16 matmul kernels a demo-model step took
~5 s against ~0.3-0.8 s in fp32 and bf16 (one thread, AMD EPYC with avx512_bf16, a loaded machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Literal

import torch

from workers.config import Device

Precision = Literal["fp32", "bf16", "fp16"]
# Autocast dtype per train.precision; fp32 runs without autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Collective backend per device: gloo runs on host memory, nccl on NVIDIA GPUs, hccl on Ascend NPUs.
# GPU workers also get gloo for the loop's host-side collectives (loss and byte totals, the corrupt
# units' merge): nccl alone refuses CPU tensors.
BACKENDS: dict[str, str] = {"cpu": "gloo", "gpu": "cpu:gloo,cuda:nccl", "npu": "hccl"}


class DeviceUnavailable(RuntimeError):
    """The spec asks for a device this machine or cluster cannot provide."""


def backend_for(device: Device) -> str:
    return BACKENDS[device]


def worker_resources(device: Device, cpus_per_worker: float) -> dict[str, float]:
    """Ray resources one training worker reserves."""
    resources = {"CPU": cpus_per_worker}
    if device == "gpu":
        resources["GPU"] = 1
    elif device == "npu":
        resources["NPU"] = 1
    return resources


# A job that spans devices reserves CPUs only in its placement bundles (Ray Train gives every worker one
# shape); its accelerator workers each lease one device of their node (lease_device).
# Seconds a worker waits for a free device on its node before it fails: another job holds them all.
DEVICE_LEASE_TIMEOUT_S = 60.0
# The Ray resource a leased device is, the accelerator-id key Ray reports it under, and the variable
# that makes it the only device the worker's torch sees.
_LEASE: dict[str, tuple[dict[str, Any], str, str]] = {
    "gpu": ({"num_gpus": 1}, "GPU", "CUDA_VISIBLE_DEVICES"),
    "npu": ({"resources": {"NPU": 1}}, "NPU", "ASCEND_RT_VISIBLE_DEVICES"),
}


class _DeviceLease:
    """Holds one device of its node in Ray's accounting while it lives, so no other job or actor is
    given it. It is owned by the worker that created it and Ray ends it with that worker."""

    def __init__(self, device: str):
        self.device = device

    def ids(self) -> list[str]:
        import ray

        return ray.get_runtime_context().get_accelerator_ids()[_LEASE[self.device][1]]


def lease_device(device: Device) -> tuple[Any, list[str]]:
    """Reserve one ``device`` device on this worker's node through Ray and make it the only one this
    process sees (before torch touches the device). Returns (the lease actor: keep the handle for
    as long as the device is used, the device ids). Raises DeviceUnavailable when none frees up."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options, key, env = _LEASE[device]
    node = ray.get_runtime_context().get_node_id()
    lease = ray.remote(_DeviceLease).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), **options).remote(device)
    try:
        ids = ray.get(lease.ids.remote(), timeout=DEVICE_LEASE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.kill(lease)
        raise DeviceUnavailable(f"no {key} of node {node} became free within {DEVICE_LEASE_TIMEOUT_S:g} s "
                                "(other jobs or actors hold them all)") from None
    os.environ[env] = ",".join(ids)
    return lease, ids


def check_available(device: Device) -> None:
    """Fail early, in the driver, when the local software cannot drive the device at all."""
    if device == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise DeviceUnavailable("resources.device is 'npu' but torch_npu is not installed")
    if device == "gpu" and not torch.backends.cuda.is_built():
        raise DeviceUnavailable("resources.device is 'gpu' but this torch build has no CUDA support "
                                "(install the CUDA build of torch: docs/operations.md, 'GPU machines')")


def torch_device(device: Device) -> torch.device:
    """The device for this worker process (after Ray has set the visible-device variables)."""
    if device == "gpu":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("worker was given a GPU but torch.cuda.is_available() is False")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    if device == "npu":
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)

        torch.npu.set_device(0)
        return torch.device("npu", 0)
    return torch.device("cpu")


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's mixed-precision context on ``device`` (device_type from the torch device, so a
    CUDA or NPU worker autocasts on its accelerator); fp32: a no-op. Parameters (the master weights)
    stay fp32 and so do their gradients and the optimizer state: autocast only casts op inputs."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling; None for fp32 and bf16 (bf16 has fp32's exponent range).

    torch's defaults: scale 2**16, halved on a step with an inf/NaN gradient (which is skipped),
    doubled after 2000 finite steps. The scale stays a power of two, which the top-k hook relies on
    to unscale its residuals exactly (workers/compression/scaling.py).
    """
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
