"""`make bench`: benchmarks run side by side in one run; writes BENCHMARKS.md and BENCHMARKS.json.

Ratios measured in the same run are the figures to quote: this machine is shared and noisy, so
absolute times move between runs while ratios of runs taken back to back hold much better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from tests.bench.compression_runs import VARIANTS, compression_section, horizon_section

ROOT = Path(__file__).resolve().parents[2]
JSON_PATH, MD_PATH = ROOT / "BENCHMARKS.json", ROOT / "BENCHMARKS.md"


def _selection(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.selection import selection_section

    return selection_section()


def _moe(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.moe_vs_dense import moe_section

    return moe_section(**({"steps": args.steps} if args.steps else {}))


def _projection(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.projection import projection_section

    return projection_section()


def _control_plane(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.control_plane import markdown, run_bench

    results = run_bench()
    return {"data": {"name": "control_plane", **results},
            "markdown": ["## Control plane (loopback; API rows exclude Ray submission)", "",
                         "`python -m tests.bench --sections control-plane`: a bounded load (fixed count, "
                         "fixed time).", "",
                         *markdown(results).splitlines()]}


def _scheduler(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.scheduler import scheduler_section

    return scheduler_section()


def _balance(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.balance import balance_section

    return balance_section(scratch, args.steps, args.reuse)


def _serving(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.serving import serving_section

    return serving_section(scratch / "serving")


def _sweeps(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.sweeps import sweeps_section

    return sweeps_section(scratch / "sweeps", args.reuse)


def _elastic(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.elastic import elastic_section

    return elastic_section(scratch / "elastic")


def _data(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.data import data_section

    return data_section(scratch, args.steps, args.reuse)


def _local_frontier(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.local_sections import frontier_section

    return frontier_section(args.steps)


def _local_horizon(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.local_sections import horizon_section

    return horizon_section()


def _local_sweep(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.local_sweep import sweep_section

    return sweep_section(scratch)


def _local_link(scratch: Path, args: argparse.Namespace) -> dict:
    from tests.bench.local_sections import link_section

    return link_section(args.steps)


SECTIONS = {
    "compression": lambda scratch, args: compression_section(scratch, args.steps, args.variants, args.reuse),
    "horizon": lambda scratch, args: horizon_section(scratch, args.steps, args.reuse),
    "local-frontier": _local_frontier,
    "local-horizon": _local_horizon,
    "local-link": _local_link,
    "local-sweep": _local_sweep,
    "selection": _selection,
    "moe": _moe,
    "projection": _projection,
    "control-plane": _control_plane,
    "scheduler": _scheduler,
    "balance": _balance,
    "serving": _serving,
    "sweeps": _sweeps,
    "elastic": _elastic,
    "data": _data,
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of every run")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="scratch folder for the runs")
    p.add_argument("--variants", nargs="*", choices=[label for label, _ in VARIANTS],
                   help="compression variants to run beside dense (default: all)")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --out (resume an interrupted bench)")
    args = p.parse_args()
    scratch = Path(args.out)
    if not args.reuse:
        shutil.rmtree(scratch, ignore_errors=True)
    started = time.time()
    for name in args.sections:
        print(f"== bench section: {name}", flush=True)
        t0 = time.time()
        section = SECTIONS[name](scratch, args)
        write_section(section, run_env(time.time() - t0))  # after every section: an interrupted bench keeps what it measured
        print("\n".join(section["markdown"]))
    print(f"bench: {round(time.time() - started)} s")


def run_env(wall_time_s: float) -> dict:
    """What a section's footer says of the machine and the run."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "wall_time_s": round(wall_time_s)}


def write_section(section: dict, env: dict) -> list[str]:
    """Merge one section into BENCHMARKS.json / BENCHMARKS.md (the others stay as they were)."""
    data = {**section["data"], "markdown": section["markdown"], "env": env}
    previous = json.loads(JSON_PATH.read_text())["sections"] if JSON_PATH.exists() else []
    kept = [s for s in previous if "markdown" in s]
    merged = [data if s["name"] == data["name"] else s for s in kept]  # a rerun keeps its place
    merged += [] if any(s["name"] == data["name"] for s in kept) else [data]
    JSON_PATH.write_text(json.dumps({"sections": merged}, indent=2))
    md = ["# Benchmarks", "",
          "Written by `make bench` (`python -m tests.bench [--sections ...]`). Figures in one table come from "
          "one run, side by side; each section says when it ran and how long it took. This machine is shared "
          "and noisy: read ratios, not absolute times.", ""]
    for s in merged:
        e = s["env"]
        md += s["markdown"] + ["", f"_{e['date']}, {e['cpus']} CPUs ({e['machine']}), Python {e['python']}; "
                                   f"this section took {e['wall_time_s']} s._", ""]
    MD_PATH.write_text("\n".join(md))
    return md


if __name__ == "__main__":
    main()
