"""ServeSpec: a typed, bounded spec for one serving deployment (``python -m jobs.serve --spec FILE``),
and what checks it against its checkpoint: the checkpoint a path resolves to (a folder, a run's
newest ``step-N``, local or ``s3://``), the model's context and the limits fitted to it, the key's hash.

Torch-free, so the control plane validates a deployment like the other kinds, with the same rules as
the driver. A spec never carries a bearer key, only (optionally) its SHA-256: jobs/serve.py takes the
key from a file or the environment, or makes one and shows it once.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from pydantic import Field

from jobs.specs.base import SpecError, read_yaml, spec_name, validate_as
from workers import confine
from workers.config import Config, ModelConfig
from workers.data.storage import (
    StorageError,  # noqa: F401  (resolve_s3_checkpoint's; the control plane catches it from here)
    is_s3,
    join,
    open_fs,
    read_bytes,
    uri_of,
    with_retries,
)
from workers.serving.config import (
    SHA256_HEX_PATTERN,
    AutoscalingSpec,
    BatchingConfig,
    ChatTemplate,
    LimitsConfig,
)

# Serve's HTTP proxy address when a deploy starts Serve (jobs/runtime/serving.py).
DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT = "127.0.0.1", 8000
# Bytes of randomness in a bearer key made by the driver or the control plane (43 URL-safe characters).
KEY_BYTES = 32


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest (highest step) checkpoint under a run's output
    folder (``<out>/ray-train/step-XXXXXXXX``); SpecError naming ``checkpoint`` otherwise, also when
    the folder or the chosen ``step-*`` leads outside the team's data roots (a link; workers/confine.py)."""
    try:
        root = confine.check(Path(path).expanduser(), "checkpoint")
        if (root / "meta.json").is_file():
            return root
        found = sorted(root.glob("**/step-*/meta.json")) if root.is_dir() else []
        if not found:
            raise SpecError(f"checkpoint: {root} is neither a checkpoint (meta.json) nor a run folder holding one")
        newest = max(found, key=lambda p: (int(p.parent.name.removeprefix("step-")), str(p))).parent
        return confine.check(newest, "checkpoint")
    except confine.OutsideRoots as e:
        raise SpecError(f"checkpoint: {e}") from None


def resolve_s3_checkpoint(uri: str) -> str:
    """``resolve_checkpoint`` for an ``s3://`` prefix: the prefix itself when it holds meta.json,
    else its newest ``step-N`` checkpoint at any depth (a run's ``checkpoint_storage``); SpecError
    naming ``checkpoint`` when it holds none, StorageError when the bucket does not answer."""
    fs, root = open_fs(uri)
    if with_retries(f"cannot read {uri}", lambda: fs.get_file_info(join(root, "meta.json"))).is_file:
        return uri_of(fs, root)
    listing = with_retries(f"cannot list {uri}",
                           lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)))
    steps = [(int(m.group(1)), info.path.rsplit("/", 1)[0]) for info in listing if info.base_name == "meta.json"
             and (m := re.fullmatch(r"step-(\d+)", info.path.rsplit("/", 2)[-2]))]
    if not steps:
        raise SpecError(f"checkpoint: {uri} is neither a checkpoint (meta.json) nor a run prefix holding one")
    return uri_of(fs, max(steps)[1])


def checkpoint_context(checkpoint: str) -> int:
    """The model's context (max_seq_len, tokens) from a resolved checkpoint's meta.json, local (under
    the job's data roots) or s3://. Torch-free: the control plane sizes a deployment's limits with it."""
    try:
        if is_s3(checkpoint):
            fs, root = open_fs(checkpoint)
            raw = read_bytes(fs, join(root, "meta.json"))
        else:
            with confine.open_file(Path(checkpoint) / "meta.json") as f:
                raw = f.read()
        # As load_model reads it: ModelConfig's default where meta.json's model leaves it out.
        context = json.loads(raw).get("model", {}).get("max_seq_len", ModelConfig.model_fields["max_seq_len"].default)
    except confine.OutsideRoots as e:  # meta.json itself links out of the roots
        raise SpecError(f"checkpoint: {e}") from None
    except (OSError, ValueError, AttributeError) as e:
        raise SpecError(f"checkpoint: {checkpoint}/meta.json cannot be read: {e}") from None
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise SpecError(f"checkpoint: {checkpoint}/meta.json names no model.max_seq_len")
    return context


def fit_limits(limits: LimitsConfig, context: int) -> LimitsConfig:
    """``limits`` for a model of ``context`` tokens: ``max_tokens`` and ``default_max_tokens`` that
    the spec leaves unset are derived from it (half the context, at most the defaults), so a spec
    naming only a checkpoint fits any model; a value set that cannot fit is a SpecError naming it."""
    max_tokens = limits.max_tokens if "max_tokens" in limits.model_fields_set else min(limits.max_tokens,
                                                                                       context // 2)
    default = limits.default_max_tokens if "default_max_tokens" in limits.model_fields_set else min(
        limits.default_max_tokens, max_tokens)
    if max_tokens >= context:
        raise SpecError(f"limits.max_tokens: {max_tokens} must be below the model's context ({context} tokens), "
                        "which also holds the prompt")
    if default > max_tokens:
        raise SpecError(f"limits.default_max_tokens: {default} must be <= limits.max_tokens ({max_tokens}, "
                        f"{'as set' if 'max_tokens' in limits.model_fields_set else 'derived from the context'})")
    return LimitsConfig(**{**limits.model_dump(), "max_tokens": max_tokens, "default_max_tokens": default})


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
