"""Prepare a corpus into tokenized parquet shards: ``python -m jobs.prepare --spec FILE``.

Runs the same ways as jobs.train: directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.prepare --spec FILE`` (the driver joins RAY_ADDRESS's cluster),
or submitted by the control plane (``--out DIR``: summary.json goes there). The source and the
output may be local folders or ``s3://`` prefixes; S3 settings come from the AWS_* environment
(workers/data/storage.py) and reach the shard tasks through their runtime_env.

Rerunning the same command resumes an interrupted preparation (finished shards are kept) or, when
the manifest is up to date, does nothing. Exit codes: 0 done, 2 invalid spec or arguments,
1 a failure (missing, empty or binary-only source, unreachable bucket, corrupt input), with a
one-paragraph message instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.specs.base import SpecError
from jobs.specs.prepare import PrepareSpec, load_prepare_spec
from workers.confine import OutsideRoots
from workers.data import CorpusError, ShardEntry, prepare, ray_runner
from workers.data.sources import ShardPlan
from workers.data.storage import StorageError, original_error
from workers.data.tokenizer import TokenizerError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help="YAML (or JSON) prepare spec, e.g. jobs/examples/prepare.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set tokenizer=bpe (repeatable)")
    p.add_argument("--out", help="folder for summary.json (the control plane passes one)")
    p.add_argument("--verbose", action="store_true", help="also show the logs of the shard tasks and of Ray")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, flush=True)


def init_ray(verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster or start an embedded one with one logical CPU per core."""
    # deferred: Ray loads (~1 s) only when there are shards to build (a bad source or an up-to-date
    # manifest answers without it)
    import ray
    from ray.data import DataContext

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    DataContext.get_current().enable_progress_bars = False
    if not verbose:  # the driver's own lines say what happens; Ray Data's plan and timings are noise
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def failure_message(e: BaseException) -> str | None:
    """The user-facing cause of a failure: a CorpusError / StorageError / TokenizerError (or a file
    linked out of the job's data roots, OutsideRoots) raised here or inside a shard task."""
    cause = original_error(e, (CorpusError, StorageError, TokenizerError, OutsideRoots))
    return None if cause is None else str(cause)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec: PrepareSpec = load_prepare_spec(args.spec, args.set)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    shard_tasks = ray_runner(spec.max_tasks, spec.cpus_per_task)

    def run_on_ray(shards: list[ShardPlan], **kw: Any) -> Iterator[ShardEntry]:
        """Ray starts only when there are shards to build: a bad source or an up-to-date manifest
        is answered without a cluster."""
        if shards:
            init_ray(args.verbose)
        yield from shard_tasks(shards, **kw)

    try:
        manifest = prepare(spec.corpus(), _log, run_on_ray)
    except Exception as e:  # Ray Data raises its own wrappers; the cause is what a user needs
        message = failure_message(e)
        if message is None and not isinstance(e, OSError):
            raise
        print(f"error: {message or e}", file=sys.stderr)
        return 1

    summary = {"name": spec.name, "path": spec.path, "fingerprint": manifest.fingerprint,
               "tokenizer": manifest.tokenizer.kind, "vocab_size": manifest.tokenizer.vocab_size,
               "input_bytes": manifest.input_bytes, "skipped_binary": manifest.skipped_binary,
               "skipped_links": manifest.skipped_links,
               **{f"{s}_tokens": manifest.splits[s].tokens for s in manifest.splits},
               **{f"{s}_rows": manifest.splits[s].rows for s in manifest.splits},
               "wall_time_s": round(time.perf_counter() - started, 1)}
    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"== {spec.name}: {json.dumps(summary)} ==")
    return 0


if __name__ == "__main__":
    sys.exit(main())
