"""A serve spec's Ray Serve application: deploy it, delete it, read its status (the Python API of
``python -m jobs.serve``, for tests and benchmarks too; Ray must be initialised).

One Serve application per spec, deployed imperatively under its own name and route prefix, so
deploying a second spec leaves the first serving, and deploying a spec again under the same name
rolls its replicas over to the new checkpoint or settings (Serve starts new replicas and drains the
old ones; no request is dropped). The checkpoint is resolved once here (jobs/specs/serve.py);
replicas of an ``s3://`` checkpoint copy it themselves, with this process's AWS_* settings in their
runtime_env, and open local files under this job's data roots (``replica_runtime_env``). Replicas
only ever see the bearer key's hash.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass

import ray
from pydantic import BaseModel
from ray import serve

from jobs.specs.base import SpecError
from jobs.specs.serve import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    KEY_BYTES,
    ServeSpec,
    checkpoint_context,
    fit_limits,
    key_hash,
    resolve_checkpoint,
    resolve_s3_checkpoint,
)
from workers import confine
from workers.data import s3_env
from workers.data.storage import is_s3
from workers.serving.config import ReplicaConfig


@dataclass(frozen=True)
class Deployment:
    name: str
    route_prefix: str
    base_url: str  # the OpenAI base URL: http://host:port/<prefix>/v1
    checkpoint: str  # the resolved checkpoint: a folder, or an s3:// prefix
    api_key: str | None  # the key when deploy() made it (show it once, store only its hash); else None
    key_sha256: str


class DeploymentStatus(BaseModel):
    name: str
    status: str  # Serve's application status: DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, ...
    message: str
    replicas: dict[str, int]  # replica state (RUNNING, STARTING, STOPPING, ...) -> count


def deploy(spec: ServeSpec, api_key: str | None = None, *, http_host: str = DEFAULT_HTTP_HOST,
           http_port: int = DEFAULT_HTTP_PORT) -> Deployment:
    """Deploys (or updates in place, rolling) the spec's application and returns once it runs.
    Starts Serve's HTTP proxy on http_host:http_port when Serve is not running yet."""
    # deferred: the replicas' class imports torch (~2.5 s), needed to deploy, not to delete or read status
    from workers.serving.app import CompletionServer

    made_key = None
    if api_key is None and spec.key_sha256 is None:
        api_key = made_key = secrets.token_urlsafe(KEY_BYTES)
    digest = key_hash(api_key) if api_key is not None else spec.key_sha256
    if spec.key_sha256 is not None and not hmac.compare_digest(digest, spec.key_sha256):
        raise SpecError("key_sha256: does not match the key given to deploy it")
    on_s3 = is_s3(spec.checkpoint)
    checkpoint = resolve_s3_checkpoint(spec.checkpoint) if on_s3 else str(resolve_checkpoint(spec.checkpoint))
    limits = fit_limits(spec.limits, checkpoint_context(checkpoint))
    config = ReplicaConfig(name=spec.name, checkpoint=checkpoint, key_sha256=digest,
                           stats_key_sha256=spec.stats_key_sha256, batching=spec.batching,
                           limits=limits, int8=spec.int8, torch_threads=spec.torch_threads,
                           chat_template=spec.chat_template)
    runtime_env = replica_runtime_env(s3_env() if on_s3 else {})
    b = spec.batching
    app = CompletionServer.options(
        name=spec.name,
        autoscaling_config=spec.autoscaling.model_dump(),
        # Serve's batch queue needs room for every row of every concurrent batch, plus a few
        # non-generating calls (models, score, stats) beside them.
        max_ongoing_requests=b.max_batch_size * b.max_concurrent_batches + 4,
        ray_actor_options={"num_cpus": spec.num_cpus, **({"runtime_env": runtime_env} if runtime_env else {})},
    ).bind(config.model_dump())
    serve.start(http_options={"host": http_host, "port": http_port})
    try:
        serve.run(app, name=spec.name, route_prefix=spec.prefix, blocking=False)
    except RuntimeError as e:  # Serve says which deployment failed; its status says why
        raise RuntimeError(f"{e} {replica_error(spec.name)}".strip()) from None
    return Deployment(name=spec.name, route_prefix=spec.prefix, checkpoint=checkpoint, api_key=made_key,
                      base_url=f"http://{http_host}:{http_port}{spec.prefix.rstrip('/')}/v1", key_sha256=digest)


def replica_runtime_env(env_vars: dict[str, str]) -> dict | None:
    """The replicas' runtime_env: this driver's job runtime_env plus ``env_vars`` (an ``s3://``
    checkpoint's AWS_* settings: replicas copy it themselves) and this job's data roots
    (``ORCH_DATA_ROOTS``: replicas open the checkpoint's files under them, workers/confine.py), or
    None when there is nothing to add. Why explicit: Serve gives a deployment the driver's job
    runtime_env only when it sets none itself (``build_app._set_default_runtime_env``, Ray 2.60),
    and the roots of a driver run by hand live in its process environment, not in a runtime_env."""
    extra = dict(env_vars)
    if (roots := os.environ.get(confine.ROOTS_ENV)) is not None:
        extra[confine.ROOTS_ENV] = roots
    if not extra:
        return None
    job = dict(ray.get_runtime_context().runtime_env or {})
    return {**job, "env_vars": {**(job.get("env_vars") or {}), **extra}}


def replica_error(name: str) -> str:
    """The exception that stopped the application's replicas from starting (the last line of each
    failed deployment's message, which ends in the replica's traceback), or ""."""
    app = serve.status().applications.get(name)
    messages = [dep.message for dep in app.deployments.values() if dep.message] if app is not None else []
    return " ".join(m.strip().splitlines()[-1] for m in messages)


def delete(name: str) -> None:
    """Removes the application and its replicas (the other applications keep serving)."""
    serve.delete(name)


def status(name: str) -> DeploymentStatus | None:
    """The application's status and replica counts, or None when no such application runs."""
    app = serve.status().applications.get(name)
    if app is None:
        return None
    replicas: dict[str, int] = {}
    for dep in app.deployments.values():
        for state, count in dep.replica_states.items():
            replicas[str(getattr(state, "value", state))] = replicas.get(str(getattr(state, "value", state)), 0) + count
    return DeploymentStatus(name=name, status=str(getattr(app.status, "value", app.status)), message=app.message,
                            replicas=replicas)
