"""PrepareSpec: a typed, bounded spec for one corpus preparation (``python -m jobs.prepare --spec FILE``).

Flat, like ServeSpec: the preparation's own fields (workers/data/prepare_config.py) plus a name and how
much of the cluster it may take. Its required top-level ``path`` tells it apart from the other
kinds' specs in the API's union of specs. Torch-free, so the control plane validates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.specs.base import read_yaml, spec_name, validate_as
from workers.data.prepare_config import PrepareConfig


class PrepareSpec(PrepareConfig):
    name: str = spec_name("prepare")
    # Shard tasks running at once; None: as many as the cluster's free CPUs allow.
    max_tasks: int | None = Field(None, ge=1, le=100_000)
    # Logical CPUs each shard task reserves (a BPE task uses about one core).
    cpus_per_task: float = Field(1.0, gt=0.0, le=64.0)

    def corpus(self) -> PrepareConfig:
        """The preparation's own settings (what the manifest records and fingerprints)."""
        return PrepareConfig.model_validate(self.model_dump(include=set(PrepareConfig.model_fields)))


def validate_prepare_spec(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> PrepareSpec:
    return validate_as(PrepareSpec, raw, overrides, "prepare")


def load_prepare_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PrepareSpec:
    return validate_prepare_spec(read_yaml(path), overrides)
