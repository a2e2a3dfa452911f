"""TrainSpec: a typed, bounded spec for one training job (``python -m jobs.train --spec FILE``),
composed of the workers' own configs.

A spec is YAML (or the same structure as JSON over REST). ``load_spec`` parses it, applies
``--set a.b=value`` overrides and validates everything before any Ray work starts; a bad field
raises ``SpecError`` whose message names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from jobs.contracts.pools import check_pool_name, pool_device
from jobs.specs.base import read_yaml, spec_name, validate_as
from workers.config import (  # noqa: F401  (Device: re-exported for the control plane)
    VOCAB_SIZE,
    CompressionConfig,
    Config,
    DataConfig,
    Device,
    LoopConfig,
    ModelConfig,
    device_name,
)

PoolName = Annotated[str, BeforeValidator(device_name), AfterValidator(check_pool_name)]


WorkerCount = Annotated[int, Field(ge=1, le=4096)]
# A fixed size or an elastic [min, max]; the tag keeps errors to the one form given (field.elastic.0: ...).
WorkerSize = Annotated[
    Annotated[WorkerCount, Tag("fixed")] | Annotated[tuple[WorkerCount, WorkerCount], Tag("elastic")],
    Discriminator(lambda v: "elastic" if isinstance(v, (list, tuple)) else "fixed")]


class ResourcesSpec(Config):
    # An int is a fixed size. A [min, max] pair is elastic (Ray Train v2's ScalingConfig(num_workers=
    # (min, max))): the job starts once min workers fit, grows towards max as nodes come, and keeps
    # running on what remains when nodes go; every resize restarts the worker group from the latest
    # checkpoint (world-size independent, workers/checkpoint.py). Both bounds: multiples of expert_parallel.
    num_workers: WorkerSize = 2
    # An elastic job re-checks the cluster for a better size this often (seconds; Ray's default 60).
    # Each resize costs a restart and the steps since the latest checkpoint, so not much lower.
    elastic_resize_monitor_interval_s: float = Field(60.0, ge=1.0, le=3600.0)
    # cpu -> gloo, gpu -> nccl, npu -> hccl (see workers/device.py); "cuda" is read as "gpu".
    device: Annotated[Device, BeforeValidator(device_name)] = "cpu"
    # A job spanning pools: workers per pool (jobs/contracts/pools.py: an exact pool such as cpu-a or gpu-a100, or
    # a bare device), e.g. {gpu: 2, cpu: 4}. Instead of num_workers and device: num_workers becomes the
    # total and device the job's accelerator (cpu when it has none). Devices without a common
    # collective backend sync through gloo on host memory. One accelerator device per job.
    pools: dict[PoolName, Annotated[int, Field(ge=1, le=4096)]] | None = Field(None, min_length=1, max_length=16)
    cpus_per_worker: float = Field(1.0, gt=0.0, le=512.0)
    # Experts sharded over groups of this many workers (tokens travel by all-to-all); 1: every
    # worker holds every expert. Must divide num_workers and model.n_routed_experts.
    expert_parallel: int = Field(1, ge=1, le=4096)
    # Restarts from the latest checkpoint after a worker dies (a crash, an unannounced node loss),
    # before the job fails. Ray's own default is 0, so one lost node would end the run; 2 rides out
    # node losses while a deterministic bug still fails fast (it re-fires on every attempt).
    max_failures: int = Field(2, ge=0, le=100)
    # Restarts after a node announced as preempted (a drain with reason preemption: spot reclaim,
    # `ray drain-node`) went away; counted apart from max_failures since they are not the job's
    # fault and the just-in-time checkpoint bounds their cost. Bounded (Ray: -1, unlimited) so a pool
    # that is reclaimed over and over ends the job with an error instead of holding it forever.
    # -1: unlimited, as Ray.
    max_preemption_failures: int = Field(10, ge=-1, le=1000)
    # Every this many steps the workers ask Ray Train whether a node of theirs is being preempted
    # (ray.train.get_preemption_info, a barrier over all ranks, so not every step); on a notice they
    # checkpoint at once, so a preemption loses at most this many steps after Ray sees the drain
    # (its watcher polls every 5 s). 0: never ask.
    preemption_check_every: int = Field(5, ge=0, le=10_000)

    @field_validator("num_workers")
    @classmethod
    def _min_le_max(cls, size: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(size, tuple) and size[0] > size[1]:
            raise ValueError(f"an elastic size is [min, max] with min <= max, got [{size[0]}, {size[1]}]")
        return size

    @model_validator(mode="before")
    @classmethod
    def _from_pools(cls, raw: Any) -> Any:
        """With ``pools``, derive num_workers (the total) and device (the one accelerator)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("pools"), dict) or not raw["pools"]:
            return raw
        if isinstance(raw.get("num_workers"), (list, tuple)):
            raise ValueError("pools cannot run with an elastic num_workers [min, max]: pools fixes each pool's count")
        try:
            devices = {pool_device(str(device_name(name))) for name in raw["pools"]}
            counts = [int(n) for n in raw["pools"].values()]
        except (TypeError, ValueError):
            return raw  # the field validators name the bad pool or count
        if min(counts) < 1:
            return raw
        accelerators = devices - {"cpu"}
        if len(accelerators) > 1:
            raise ValueError(f"pools: one accelerator device per job, got {sorted(accelerators)}")
        derived = {"num_workers": sum(counts), "device": accelerators.pop() if accelerators else "cpu"}
        for field, value in derived.items():  # a stored spec (model_dump) carries the derived values back
            if field in raw and device_name(raw[field]) != value:
                raise ValueError(f"pools and {field} are mutually exclusive: pools gives every worker's pool")
        return {**raw, **derived}

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a [min, max] pair."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the job runs on: an elastic job's min, else num_workers."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the job runs on (and holds resources for): an elastic job's max."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def worker_pools(self) -> dict[str, int]:
        """Pool (or bare device) -> worker count at the job's largest size: ``pools``, or
        ``{device: max_workers}`` (an elastic job's max: what Ray Train asks the cluster for)."""
        return dict(self.pools) if self.pools else {self.device: self.max_workers}

    @property
    def mixed_devices(self) -> bool:
        """Whether the job's workers are of more than one device."""
        return len({pool_device(name) for name in self.worker_pools()}) > 1


class TrainSpec(Config):
    name: str = spec_name("train")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    compression: CompressionConfig = CompressionConfig()
    train: LoopConfig = LoopConfig()
    resources: ResourcesSpec = ResourcesSpec()
    # Where Ray Train keeps the run (RunConfig.storage_path): checkpoints under <it>/ray-train/step-N.
    # A local folder shared by the nodes or an s3://bucket/prefix (AWS_* settings as for data.path);
    # None: the job's output folder (--out). A run whose storage already holds checkpoints resumes
    # from the latest, so two jobs running at once must not share one.
    checkpoint_storage: str | None = Field(None, min_length=1, max_length=1024)

    @field_validator("checkpoint_storage")
    @classmethod
    def _local_or_s3(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError(f"{value!r}: a local folder or s3://bucket/prefix")
        if value is not None and value.startswith("s3://") and not value[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"{value!r}: no bucket (expected s3://bucket/prefix)")
        return value

    @model_validator(mode="after")
    def _check_sections_agree(self) -> TrainSpec:
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(f"model.max_seq_len ({self.model.max_seq_len}) must be >= data.seq_len ({self.data.seq_len})")
        res, ep = self.resources, self.resources.expert_parallel
        workers = f"both bounds of resources.num_workers ([{res.min_workers}, {res.max_workers}])" if res.elastic \
            else f"resources.num_workers ({res.num_workers})"
        if res.min_workers % ep or res.max_workers % ep or self.model.n_routed_experts % ep:
            raise ValueError(f"resources.expert_parallel ({ep}) must divide {workers} "
                             f"and model.n_routed_experts ({self.model.n_routed_experts})")
        if self.model.vocab_size < VOCAB_SIZE:
            raise ValueError(f"model.vocab_size ({self.model.vocab_size}) must be >= {VOCAB_SIZE}, the byte tokenizer's vocabulary")
        if self.train.precision == "fp16" and self.compression.method == "powersgd":
            # PowerSGD's error memory would keep loss-scaled values, and an overflowed step's inf for good.
            raise ValueError("train.precision 'fp16' cannot run with compression.method 'powersgd' "
                             "(use bf16, or topk whose error feedback unscales)")
        return self


def validate_spec(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> TrainSpec:
    return validate_as(TrainSpec, raw, overrides, "train")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainSpec:
    return validate_spec(read_yaml(path), overrides)
