"""Train a sharded MoE with compressed gradient sync: ``python -m jobs.train --spec FILE``.

The one entry point for every way in: run directly (an embedded local Ray cluster starts), under
``ray job submit -- python -m jobs.train ...`` (Ray Jobs sets RAY_ADDRESS and the driver joins
that cluster), or submitted by the control plane, which runs exactly this command.

Exit codes: 0 done, 2 invalid spec or arguments (nothing ran), 1 a runtime failure (missing
corpus, corrupt shard, training error), each with a one-paragraph message instead of a traceback.

With ``--out DIR``, checkpoints go under DIR and the run resumes from DIR's latest checkpoint when
there is one, so rerunning the same command continues an interrupted job.

Output: one live progress bar on a terminal, else one ``[progress] ...`` line per report (which the
control plane parses from the job's log); see jobs/display.py. The logs of Ray's own processes and
of the workers reach the driver only with ``--verbose``; a failed worker's error is printed either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from jobs.display import RunDisplay, follow
from jobs.specs import SpecError, TrainSpec, load_spec

PROMPTS = ("def ", "import ", "class ")
SAMPLE_BYTES = 160
RUN_NAME = "ray-train"  # Ray Train's run folder inside --out; fixed so a rerun finds the checkpoints
# Python processes the embedded cluster's raylet starts at once (and a quarter of the count it warns at).
STARTUP_CONCURRENCY = 8


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


def init_ray(spec: TrainSpec, verbose: bool) -> None:
    """Join RAY_ADDRESS's cluster or start an embedded one.

    Without ``verbose`` the workers' and Ray actors' stdout/stderr stay in the session's log files
    (log_to_driver) and the driver's "ray" logger shows errors only (token set-up, "Started a local
    Ray instance"): progress comes over the display's queue and failures in fit()'s exception.
    """
    import ray
    from ray.data import DataContext

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        # Logical CPUs are scheduling tokens: leave room for Ray Data's read/pack tasks beside the
        # training workers, which otherwise take every core of a small machine and starve the input.
        cpus = max(os.cpu_count() or 1, int(spec.resources.num_workers * spec.resources.cpus_per_worker) + 2)
        # The dashboard (loopback only) serves Ray's state API, which Ray Train's controller polls.
        # worker_maximum_startup_concurrency: the raylet warns the driver each time the Python
        # processes it started reach 4x this (default: the cores, 2 on a small machine), which a
        # run's ~14 (workers, Train controller, Ray Data actors and tasks) does; it also caps how
        # many of them start at once.
        ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       _system_config={"worker_maximum_startup_concurrency": STARTUP_CONCURRENCY}, **quiet)
        print(f"ray: embedded local cluster; dashboard at http://{ctx.dashboard_url}", flush=True)
    DataContext.get_current().enable_progress_bars = False


def run_training(spec: TrainSpec, manifest: dict[str, Any], out: Path, progress: Any, verbose: bool) -> Any:
    """Ray Train's fit(); rank 0 sends its progress to ``progress`` (a ray.util.queue.Queue)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.data import make_datasets
    from workers.device import backend_for, worker_resources
    from workers.loop import train_loop_per_worker

    datasets = make_datasets(manifest, spec.data.seq_len, spec.seed)
    res = spec.resources
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": spec.model.model_dump(), "compression": spec.compression.model_dump(),
            "loop": spec.train.model_dump(), "seed": spec.seed, "device": res.device, "has_val": "val" in datasets,
            "expert_parallel": res.expert_parallel, "progress": progress,
        },
        torch_config=TorchConfig(backend=backend_for(res.device)),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.device == "gpu",
                                     resources_per_worker=worker_resources(res.device, res.cpus_per_worker)),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
        datasets=datasets,
    )
    return trainer.fit()


def sample_text(checkpoint_dir: Path, spec: TrainSpec) -> list[str]:
    """Generate a few lines from the final checkpoint in this process, on the CPU."""
    import torch

    from workers.data import EOS_TOKEN
    from workers.moe.model import MoETransformer

    model = MoETransformer(spec.model)
    model.load_state_dict(torch.load(checkpoint_dir / "model.pt", map_location="cpu"))
    model.eval()
    torch.manual_seed(spec.seed)
    samples = []
    for prompt in PROMPTS:
        idx = torch.tensor([list(prompt.encode())], dtype=torch.long)  # (1, prompt_len)
        with torch.no_grad():
            out = model.generate(idx, max_new_tokens=SAMPLE_BYTES, temperature=0.8)[0].tolist()
        if EOS_TOKEN in out:
            out = out[: out.index(EOS_TOKEN)]
        samples.append(bytes(out).decode("utf-8", errors="replace"))
    return samples


def summarize(spec: TrainSpec, metrics: dict[str, Any], checkpoint: str, elapsed_s: float) -> dict[str, Any]:
    keys = ("final_loss", "eval_loss", "steps", "tokens_per_s", "wire_bytes", "dense_bytes", "compression",
            "final_loss_window", "world_size", "moe")
    summary = {k: metrics.get(k) for k in keys}
    summary.update({
        "name": spec.name,
        "method": spec.compression.method, "density": spec.compression.density,
        "error_feedback": spec.compression.error_feedback,
        "wall_time_s": round(elapsed_s, 1), "checkpoint": checkpoint, "spec": spec.model_dump(mode="json"),
    })
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from workers.data import DataError, build_shards, verify_shards
    from workers.device import DeviceUnavailable, check_available

    try:
        check_available(spec.resources.device)
        manifest = build_shards(spec.data, _log)
        verify_shards(manifest)
    except (DataError, DeviceUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out = Path(args.out or f"runs/{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    _log(f"train: {spec.resources.num_workers} workers on {spec.resources.device}, "
         f"{spec.train.steps} steps, compression {spec.compression.method}"
         + (f" density {spec.compression.density} error_feedback {spec.compression.error_feedback}"
            if spec.compression.method == "topk" else "") + f"; output in {out}")

    init_ray(spec, args.verbose)
    try:
        with follow(RunDisplay(spec.train.steps, live=sys.stdout.isatty())) as progress:
            result = run_training(spec, manifest, out, progress, args.verbose)
    except Exception as e:  # Ray Train raises its own error types; the cause is what a user needs
        print(training_error(e, args.verbose), file=sys.stderr)
        return 1

    ckpt_path = Path(result.checkpoint.path)
    summary = summarize(spec, result.metrics, str(ckpt_path), time.perf_counter() - started)
    if not args.no_sample:
        summary["samples"] = sample_text(ckpt_path, spec)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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


def print_summary(s: dict[str, Any], out: Path) -> None:
    mb = 1e6
    lines = [
        "",
        f"== {s['name']}: {s['steps']} steps on {s['world_size']} workers in {s['wall_time_s']:.0f} s ==",
        f"final loss {s['final_loss']:.4f} (mean of last {s['final_loss_window']} steps)"
        + (f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""),
        f"throughput {s['tokens_per_s']:.0f} tokens/s",
        f"gradient bytes sent {s['wire_bytes'] / mb:.1f} MB vs {s['dense_bytes'] / mb:.1f} MB dense "
        f"({s['compression']:.1f}x less)",
        f"MoE MaxVio per layer {s['moe']['max_vio']}, dropped {s['moe']['drop_frac']}",
        f"summary: {out / 'summary.json'}",
    ]
    for prompt_sample in s.get("samples", []):
        lines += ["", "--- sample ---", prompt_sample]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
