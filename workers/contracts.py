"""The typed records that cross process boundaries in a training run, one definition each.

- ``WorkerConfig``: what the driver hands every Ray Train worker (``train_loop_config["worker"]``);
- ``ProgressRecord`` (workers/progress.py, with its line format): what rank 0 reports every
  ``log_every`` steps; the driver shows it, and prints it as a ``[progress] ...`` line that the
  control plane parses back from the job's log;
- ``RunMetrics``: what the loop reports with its final checkpoint;
- ``TrainSummary``: ``summary.json`` in the job's output folder, read by the control plane.

Torch-free (pydantic only), so the control plane validates the same records (through jobs/).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.config import CompressionConfig, Config, Device, LoopConfig, ModelConfig


class WorkerConfig(Config):
    model: ModelConfig
    compression: CompressionConfig
    loop: LoopConfig
    seed: int = Field(ge=0)
    device: Device
    expert_parallel: int = Field(1, ge=1)
    # A job spanning pools (resources.pools): the device each node gives, Ray node id -> device,
    # resolved by the driver from the node's pool (jobs/contracts/pools.py); a worker takes its device from the
    # node it was placed on. Empty: every worker has ``device``.
    node_devices: dict[str, Device] = {}
    # The job mixes devices, so its placement bundles reserve CPUs only and each accelerator worker
    # leases its device (workers/device.py, lease_device).
    lease_devices: bool = False
    # The job's output folder: its control/ subfolder carries "checkpoint now" requests
    # (workers/control.py); None: nobody can ask.
    control_dir: str | None = None
    # A PBT segment of a sweep (jobs/runtime/sweep_trial.py): start from this checkpoint folder when the run has
    # none of its own, and end after the checkpoint at stop_at_step. None: neither.
    init_checkpoint: str | None = None
    stop_at_step: int | None = Field(None, ge=1)
    # Every this many steps all ranks ask Ray Train for a preemption notice (a barrier, so not every
    # step) and checkpoint on one (resources.preemption_check_every); 0: never.
    preemption_check_every: int = Field(0, ge=0)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a newer writer may add fields; readers keep working


class MoEStats(_Record):
    max_vio: list[float]  # per layer, over the final window
    drop_frac: list[float]


class RunMetrics(_Record):
    steps: int
    final_loss: float | None
    final_loss_window: int
    eval_loss: float | None
    tokens_per_s: float
    wire_bytes: int
    dense_bytes: int
    compression: float
    world_size: int
    moe: MoEStats


class TrainSummary(RunMetrics):
    name: str
    method: str
    density: float
    error_feedback: bool
    wall_time_s: float
    checkpoint: str
    spec: dict[str, Any]
    samples: list[str] = []

    def numbers(self) -> dict[str, float | int]:
        """The run's scalar figures, for a finished job's metrics in the control plane."""
        keys = [*RunMetrics.model_fields, "wall_time_s"]
        return {k: v for k, v in self.model_dump(include=set(keys)).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
