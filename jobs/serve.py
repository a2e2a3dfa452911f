"""Serve a checkpoint over HTTP with Ray Serve: ``python -m jobs.serve --spec FILE``.

One Serve application per spec, deployed imperatively under its own name and route prefix, so
deploying a second spec leaves the first serving, and deploying a spec again under the same name
rolls its replicas over to the new checkpoint or settings (Serve starts new replicas and drains
the old ones; no request is dropped). The same as a Python API: jobs/runtime/serving.py (``deploy``,
``delete``, ``status``).

Checkpoints: a folder or an ``s3://`` prefix (the checkpoint itself, or a run's output folder or
``checkpoint_storage``: its newest ``step-N``, jobs/specs/serve.py), resolved once here; replicas of an
``s3://`` checkpoint copy it themselves, with this process's AWS_* settings in their runtime_env.

Bearer keys: a spec carries at most the key's SHA-256 (``key_sha256``). The key itself comes from
``--key-file`` or MOE_SERVE_API_KEY, or is made here; replicas only ever see the hash. A key made
here is never printed or logged (a job's log outlives the terminal and is readable by the whole
team): it is written to ``<out>/api_key``, readable by its owner only (0600; ``--out``, default
``runs/<name>-<time>``), and only that path is printed. ``--prompt`` keeps it in memory.
``deploy()`` hands a key it made back to its Python caller (``Deployment.api_key``).

Checkpoint files are read under the job's data roots (ORCH_DATA_ROOTS, workers/confine.py): a
checkpoint, ``step-*`` folder or file linking outside them is refused, here (exit 2) for what this
process reads and in the replicas (the deploy fails naming the file) for what they load; replicas
get the same roots through their runtime_env (jobs/runtime/serving.py ``replica_runtime_env``).

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
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from jobs.specs.base import SpecError
from jobs.specs.serve import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, KEY_BYTES, StorageError, load_serve_spec

if TYPE_CHECKING:
    from jobs.runtime.serving import Deployment

KEY_ENV = "MOE_SERVE_API_KEY"
KEY_FILE = "api_key"  # in the --out folder: a key made by the command line, mode 0600
# One --prompt request: the whole completion on a busy CPU, with the replica just started.
PROMPT_TIMEOUT_S = 120.0


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
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def delete_main(name: str) -> int:
    """``--delete NAME`` on the cluster at RAY_ADDRESS: 0 once the application is gone (or was)."""
    if not os.environ.get("RAY_ADDRESS"):
        print("error: --delete needs RAY_ADDRESS (the cluster whose application to remove)", file=sys.stderr)
        return 2
    # deferred: Ray and Serve load (~1.5 s) once the arguments are known good, not for --help
    import ray

    from jobs.runtime.serving import delete, status

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
    # deferred: Ray and Serve load (~1.5 s) once the spec is known good, so --help and a bad spec answer at once
    import ray

    from jobs.runtime.serving import delete, deploy

    attached = bool(os.environ.get("RAY_ADDRESS"))
    port = args.port or (DEFAULT_HTTP_PORT if attached or args.prompt is None else _free_port(args.host))
    # Without --verbose the replicas' and Serve's own INFO lines stay in Ray's session logs.
    ray.init(address=os.environ["RAY_ADDRESS"] if attached else "local", logging_level="ERROR",
             log_to_driver=args.verbose)
    if not args.verbose:  # importing ray.serve (above) set its logger to INFO; quieten it
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
