"""Serve a checkpoint over HTTP with Ray Serve: ``python -m jobs.serve --spec FILE``.

One Serve application per spec, deployed imperatively under its own name and route prefix, so
deploying a second spec leaves the first serving, and deploying a spec again under the same name
rolls its replicas over to the new checkpoint or settings (Serve starts new replicas and drains
the old ones; no request is dropped).

The Python API for the control plane (Ray must be initialised: ``ray.init(address=...)``):
``deploy(spec, api_key=None) -> Deployment``, ``delete(name)``, ``status(name) -> DeploymentStatus``.

Checkpoints: a folder or an ``s3://`` prefix (the checkpoint itself, or a run's output folder or
``checkpoint_storage``: its newest ``step-N``), resolved once here; replicas of an ``s3://``
checkpoint copy it themselves, with this process's AWS_* settings in their runtime_env.

Bearer keys: a spec carries at most the key's SHA-256 (``key_sha256``). The key itself comes from
``--key-file`` or MOE_SERVE_API_KEY, or is made here; replicas only ever see the hash. A key made
here is never printed or logged (a job's log outlives the terminal and is readable by the whole
team): it is written to ``<out>/api_key``, readable by its owner only (0600; ``--out``, default
``runs/<name>-<time>``), and only that path is printed. ``--prompt`` keeps it in memory.
``deploy()`` hands a key it made back to its caller (``Deployment.api_key``).

Checkpoint files are read under the job's data roots (ORCH_DATA_ROOTS, workers/confine.py): a
checkpoint, ``step-*`` folder or file linking outside them is refused, here (exit 2) for what this
process reads and in the replicas (the deploy fails naming the file) for what they load; replicas
get the same roots through their runtime_env (``replica_runtime_env``).

Run directly, an embedded Ray cluster starts and the command serves until Ctrl-C (the cluster ends
with it). Under ``ray job submit`` (RAY_ADDRESS set) it deploys, prints the URL and exits: Serve
applications outlive the driver. Exit codes: 0 deployed, 2 invalid spec or arguments, 1 a failure.

Two more modes: ``--delete NAME`` removes one application (what the control plane's reconciler runs
as a Ray job: Serve's REST API can only replace the whole set); ``--prompt TEXT`` deploys, sends the
prompt over HTTP with the key, prints the answer, deletes the application and exits (``make demo``'s
last step; on an embedded cluster Serve listens on a free port unless ``--port`` is given).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from jobs.serve_spec import ServeSpec, load_serve_spec
from jobs.specs import SpecError
from workers import confine
from workers.config import ModelConfig
from workers.data.storage import (
    StorageError,  # resolve_s3_checkpoint's; the control plane catches it from here
)
from workers.serving.config import LimitsConfig

KEY_ENV = "MOE_SERVE_API_KEY"
DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT = "127.0.0.1", 8000
# Bytes of randomness in a key made here (43 URL-safe characters).
KEY_BYTES = 32
KEY_FILE = "api_key"  # in the --out folder: a key made by the command line, mode 0600
# One --prompt request: the whole completion on a busy CPU, with the replica just started.
PROMPT_TIMEOUT_S = 120.0


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
    import pyarrow.fs as pafs

    from workers.data.storage import join, open_fs, uri_of, with_retries

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
    from workers.data.storage import is_s3, join, open_fs, read_bytes

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


def deploy(spec: ServeSpec, api_key: str | None = None, *, http_host: str = DEFAULT_HTTP_HOST,
           http_port: int = DEFAULT_HTTP_PORT) -> Deployment:
    """Deploys (or updates in place, rolling) the spec's application and returns once it runs.
    Starts Serve's HTTP proxy on http_host:http_port when Serve is not running yet."""
    from ray import serve

    from workers.data import s3_env
    from workers.data.storage import is_s3
    from workers.serving.app import CompletionServer
    from workers.serving.config import ReplicaConfig

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
    import ray

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
    from ray import serve

    app = serve.status().applications.get(name)
    messages = [dep.message for dep in app.deployments.values() if dep.message] if app is not None else []
    return " ".join(m.strip().splitlines()[-1] for m in messages)


def delete(name: str) -> None:
    """Removes the application and its replicas (the other applications keep serving)."""
    from ray import serve

    serve.delete(name)


def status(name: str) -> DeploymentStatus | None:
    """The application's status and replica counts, or None when no such application runs."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return None
    replicas: dict[str, int] = {}
    for dep in app.deployments.values():
        for state, count in dep.replica_states.items():
            replicas[str(getattr(state, "value", state))] = replicas.get(str(getattr(state, "value", state)), 0) + count
    return DeploymentStatus(name=name, status=str(getattr(app.status, "value", app.status)), message=app.message,
                            replicas=replicas)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spec", help="YAML serve spec, e.g. jobs/examples/serve.yaml")
    mode.add_argument("--delete", metavar="NAME", help="remove the application NAME (the others keep serving)")
    p.add_argument("--prompt", metavar="TEXT", help="deploy, answer TEXT over HTTP, print it, delete, exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    p.add_argument("--key-file", help=f"file holding the bearer key (else ${KEY_ENV}, else one is made and shown)")
    p.add_argument("--host", default=DEFAULT_HTTP_HOST, help="Serve's HTTP host when this starts Serve")
    p.add_argument("--port", type=int, help=f"Serve's HTTP port when this starts Serve (default {DEFAULT_HTTP_PORT}; "
                                             "--prompt on an embedded cluster: a free port)")
    p.add_argument("--out", help=f"folder for the {KEY_FILE} file (mode 0600) when a key is made here "
                                  "(default runs/<name>-<time>)")
    p.add_argument("--verbose", action="store_true", help="also show the logs of Serve and of the replicas")
    args = p.parse_args(argv)
    if args.prompt is not None and args.spec is None:
        p.error("--prompt needs --spec")
    return args


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def delete_main(name: str) -> int:
    """``--delete NAME`` on the cluster at RAY_ADDRESS: 0 once the application is gone (or was)."""
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        print("error: --delete needs RAY_ADDRESS (the cluster whose application to remove)", file=sys.stderr)
        return 2
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
    if status(name) is None:
        print(f"no application {name}: nothing to delete", flush=True)
        return 0
    delete(name)
    print(f"deleted application {name}", flush=True)
    return 0


def write_key_file(key: str, folder: Path) -> Path:
    """``folder/api_key`` holding ``key``, readable and writable by its owner only from its first
    byte (created 0600; an old file, or a link in its place, is removed first, never followed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path.resolve()


def answer(d: Deployment, key: str, prompt: str) -> str:
    """The completion of ``prompt`` (greedy, the deployment's default length), over plain HTTP."""
    import httpx

    r = httpx.post(f"{d.base_url}/completions", json={"model": d.name, "prompt": prompt, "temperature": 0},
                   headers={"Authorization": f"Bearer {key}"}, timeout=PROMPT_TIMEOUT_S)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.delete is not None:
        return delete_main(args.delete)
    try:
        spec = load_serve_spec(args.spec, args.set)
        key = Path(args.key_file).read_text().strip() if args.key_file else os.environ.get(KEY_ENV) or None
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --key-file: {e.strerror}", file=sys.stderr)
        return 2
    key_file = None
    if key is None and spec.key_sha256 is None and args.prompt is None:  # made here: to a file, never printed
        key = secrets.token_urlsafe(KEY_BYTES)
        try:
            key_file = write_key_file(key, Path(args.out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        except OSError as e:
            print(f"error: --out: cannot write the key file: {e}", file=sys.stderr)
            return 2
    import ray

    attached = bool(os.environ.get("RAY_ADDRESS"))
    port = args.port or (DEFAULT_HTTP_PORT if attached or args.prompt is None else _free_port(args.host))
    # Without --verbose the replicas' and Serve's own INFO lines stay in Ray's session logs.
    ray.init(address=os.environ["RAY_ADDRESS"] if attached else "local", logging_level="ERROR",
             log_to_driver=args.verbose)
    if not args.verbose:
        import ray.serve  # noqa: F401 - importing it sets its logger to INFO; quieten it after that

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        d = deploy(spec, key, http_host=args.host, http_port=port)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:  # an s3:// checkpoint whose bucket does not answer (it may later)
        print(f"error: checkpoint: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # Serve's deploy errors carry the replica's traceback; the cause is what a user needs
        print(f"error: deploying {spec.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"serving {d.name} from {d.checkpoint}\n  OpenAI base URL: {d.base_url}", flush=True)
    if args.prompt is not None:
        try:
            print(f"prompt: {args.prompt!r}\nanswer: {answer(d, key or d.api_key, args.prompt)!r}", flush=True)
        except Exception as e:  # noqa: BLE001 - any HTTP failure is this mode's failure, said in one line
            print(f"error: asking {d.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        finally:
            delete(d.name)
        return 0
    if key_file is not None:
        print(f"  API key: made here, in {key_file} (readable by you only; the service keeps its SHA-256)",
              flush=True)
    if attached:
        return 0
    print("serving until Ctrl-C (the embedded Ray cluster ends with this process)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
