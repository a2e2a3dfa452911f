"""ServeSpec: a typed, bounded spec for one serving deployment (``python -m jobs.serve --spec FILE``).

Torch-free, so the control plane validates it like the other kinds. A spec never carries a bearer
key, only (optionally) its SHA-256: jobs/serve.py takes the key from a file or the environment, or
makes one and shows it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.specs import read_yaml, spec_name, validate_as
from workers.config import Config
from workers.serving.config import (
    SHA256_HEX_PATTERN,
    AutoscalingSpec,
    BatchingConfig,
    ChatTemplate,
    LimitsConfig,
)


class ServeSpec(Config):
    # The Serve application's name and the model id clients pass (``model``).
    name: str = spec_name("moe")
    # A checkpoint folder (meta.json + model.pt), or a training run's output folder: its latest
    # checkpoint; either may be an s3://bucket/prefix (a run's checkpoint_storage). Local paths:
    # every node that runs a replica must see the same folder.
    checkpoint: str = Field(min_length=1)
    # Where the routes live under Serve's HTTP address; default "/<name>".
    route_prefix: str | None = Field(None, max_length=128, pattern=r"^/[A-Za-z0-9_.\-/]*$")
    # SHA-256 (hex) of the bearer key; None: jobs/serve.py reads or makes the key.
    key_sha256: str | None = Field(None, pattern=SHA256_HEX_PATTERN)
    # SHA-256 (hex) of a key that reads /v1/stats only: the control plane's, for the dashboard's
    # deployment page (set by the service; None: /v1/stats takes the bearer key alone).
    stats_key_sha256: str | None = Field(None, pattern=SHA256_HEX_PATTERN)
    batching: BatchingConfig = BatchingConfig()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    limits: LimitsConfig = LimitsConfig()
    # Logical CPUs each replica reserves (0: replicas only share the node's cores, as in tests).
    num_cpus: float = Field(1.0, ge=0.0, le=512.0)
    torch_threads: int = Field(1, ge=1, le=256)
    int8: bool = False
    # How /v1/chat/completions renders messages ({role}/{content} slots, workers/serving/chat.py);
    # None: the checkpoint's chat_template.json, else a plain "role: content" transcript.
    chat_template: ChatTemplate | None = None

    @property
    def prefix(self) -> str:
        return self.route_prefix or f"/{self.name}"


def validate_serve_spec(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> ServeSpec:
    return validate_as(ServeSpec, raw, overrides, "serve")


def load_serve_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ServeSpec:
    return validate_serve_spec(read_yaml(path), overrides)
