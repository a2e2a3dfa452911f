"""Train a sharded MoE with compressed gradient sync: ``python -m jobs.train --spec FILE``.

The one entry point for every way in: run directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.train ...`` (Ray Jobs sets RAY_ADDRESS and the driver joins
that cluster), or submitted by the control plane, which runs exactly this command.

Exit codes: 0 done, 2 invalid spec or arguments (nothing ran), 1 a runtime failure (missing
corpus, corrupt shard, training error), each with a one-paragraph message instead of a traceback.

With ``--out DIR``, checkpoints go under DIR and the run resumes from DIR's latest checkpoint when
there is one, so rerunning the same command continues an interrupted job. A spec's
``checkpoint_storage`` (a folder or ``s3://bucket/prefix``) holds the checkpoints instead, with the
same resume rule; DIR then keeps summary.json and the "checkpoint now" control folder, which are
local by nature (workers/control.py). Under a team's data roots (ORCH_DATA_ROOTS, set by the
control plane), a checkpoint folder that is, or holds, a link leading outside them is refused
before anything is written (exit 1, naming the link; jobs/runtime/trainer.py ``check_storage``).

Output: one live progress bar on a terminal, else one ``[progress] ...`` line per report (which the
control plane parses from the job's log); see jobs/runtime/display.py. The logs of Ray's own processes and
of the workers reach the driver only with ``--verbose``; a failed worker's error is printed either way.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from jobs.contracts.training import ControlChannel, TrainSummary
from jobs.specs.base import SpecError
from jobs.specs.train import TrainSpec, load_spec
from workers.confine import OutsideRoots

# Ray Jobs sends SIGKILL 3 s after SIGTERM; the driver waits for a checkpoint a little less than that.
SIGTERM_GRACE_S = 2.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help="YAML (or JSON) job spec, e.g. jobs/examples/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--out", help="output folder: summary.json and checkpoints; resumes if it holds some")
    p.add_argument("--no-sample", action="store_true", help="skip generating text from the final checkpoint")
    p.add_argument("--verbose", action="store_true",
                   help="also show the logs of the workers and of Ray (Train, Data, raylet) as they come")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, flush=True)


def summarize(spec: TrainSpec, metrics: dict[str, Any], checkpoint: str, elapsed_s: float) -> TrainSummary:
    """summary.json: the loop's final metrics (RunMetrics) and what the run was."""
    return TrainSummary.model_validate({
        **metrics, "name": spec.name, "method": spec.compression.method, "density": spec.compression.density,
        "error_feedback": spec.compression.error_feedback, "wall_time_s": round(elapsed_s, 1),
        "checkpoint": checkpoint, "spec": spec.model_dump(mode="json"),
    })


def _checkpoint_on_sigterm(out: Path) -> None:
    """Ray Jobs stops a driver with SIGTERM and SIGKILL 3 s later, and the workers end with it: ask
    the loop for a checkpoint at the end of its current step, after which it steps no further
    (workers/control.py), wait for it within that grace, then stop as asked. (The controller asks
    earlier and waits longer before it stops a job; this covers `ray job stop` and anything else
    that stops the driver.)"""
    def handler(signum: int, frame: Any) -> None:
        channel = ControlChannel(out)
        request = channel.request_checkpoint("the driver got SIGTERM (job stopping)", hold_s=4 * SIGTERM_GRACE_S)
        if channel.wait_for_checkpoint(request, SIGTERM_GRACE_S) is None:
            channel.withdraw(request)  # the loop is gone or busy: the job's next attempt must not hold for it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # deferred: Ray, torch and pyarrow load (~3 s) once the spec is known good, so --help and a bad spec
    # answer at once
    from jobs.runtime.display import RunDisplay, follow
    from jobs.runtime.trainer import build_trainer, check_storage, checkpoint_uri, init_ray, sample_checkpoint
    from workers.data import DataError, open_training_data
    from workers.data.storage import StorageError, open_fs
    from workers.device import DeviceUnavailable, check_available

    out = Path(args.out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    try:
        check_available(spec.resources.device)
        check_storage(spec.checkpoint_storage, out)  # a link out of the team's roots: refused before any write
        data = open_training_data(spec.data, spec.model.vocab_size, _log)
        if spec.checkpoint_storage:  # an unreachable bucket fails here, before any Ray work
            open_fs(spec.checkpoint_storage)
    except (DataError, DeviceUnavailable, StorageError, OutsideRoots) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    _log(f"train: {spec.resources.num_workers} workers on {spec.resources.device}, "
         f"{spec.train.steps} steps, compression {spec.compression.method}"
         + (f" density {spec.compression.density} error_feedback {spec.compression.error_feedback}"
            if spec.compression.method == "topk" else "") + f"; output in {out}")

    init_ray(spec, args.verbose)
    _checkpoint_on_sigterm(out)
    try:
        with follow(RunDisplay(spec.train.steps, live=sys.stdout.isatty())) as progress:
            result = build_trainer(spec, data, out, progress=progress, verbose=args.verbose,
                                   storage=spec.checkpoint_storage).fit()
    except Exception as e:  # Ray Train raises its own error types; the cause is what a user needs
        print(training_error(e, args.verbose), file=sys.stderr)
        return 1

    summary = summarize(spec, result.metrics, checkpoint_uri(result.checkpoint), time.perf_counter() - started)
    if not args.no_sample:
        summary.samples = sample_checkpoint(result.checkpoint, spec)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    print_summary(summary, out)
    return 0


def training_error(e: Exception, verbose: bool) -> str:
    """What fit() raised, for a user: each worker's exception in one line (Ray's text with the workers'
    tracebacks with ``verbose``, or when the failure is not a worker's)."""
    failures: dict[int, BaseException] = getattr(e, "worker_failures", None) or {}
    if verbose or not failures:
        return f"error: training failed: {type(e).__name__}: {e}"
    by_cause: dict[str, list[str]] = {}
    for rank, exc in sorted(failures.items()):
        by_cause.setdefault(f"{type(exc).__name__}: {exc}", []).append(str(rank))
    lines = [f"error: training failed on worker {','.join(ranks)}: {cause}" for cause, ranks in by_cause.items()]
    return "\n".join(lines + ["(rerun with --verbose for the workers' tracebacks and logs)"])


def print_summary(s: TrainSummary, out: Path) -> None:
    mb = 1e6
    final = f"{s.final_loss:.4f}" if s.final_loss is not None else "n/a"
    lines = [
        "",
        f"== {s.name}: {s.steps} steps on {s.world_size} workers in {s.wall_time_s:.0f} s ==",
        f"final loss {final} (mean of last {s.final_loss_window} steps)"
        + (f", eval loss {s.eval_loss:.4f}" if s.eval_loss is not None else ""),
        f"throughput {s.tokens_per_s:.0f} tokens/s",
        f"gradient bytes sent {s.wire_bytes / mb:.1f} MB vs {s.dense_bytes / mb:.1f} MB dense "
        f"({s.compression:.1f}x less)",
        f"MoE MaxVio per layer {s.moe.max_vio}, dropped {s.moe.drop_frac}",
        f"summary: {out / 'summary.json'}",
    ]
    for prompt_sample in s.samples:
        lines += ["", "--- sample ---", prompt_sample]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
