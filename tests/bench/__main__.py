"""`make bench`: benchmarks run side by side in one run; writes BENCHMARKS.md and BENCHMARKS.json.

Ratios measured in the same run are the figures to quote: this machine is shared and noisy, so
absolute times move between runs while ratios of runs taken back to back hold much better.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from tests.bench.compression_runs import VARIANTS, compression_section

ROOT = Path(__file__).resolve().parents[2]


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
    from orchestrator.bench import markdown, run_bench

    results = run_bench()
    return {"data": {"name": "control_plane", **results},
            "markdown": ["## Control plane (loopback; API rows exclude Ray submission)", "",
                         "`python -m orchestrator.bench`: a bounded load (fixed count, fixed time).", "",
                         *markdown(results).splitlines()]}


SECTIONS = {
    "compression": lambda scratch, args: compression_section(scratch, args.steps, args.variants),
    "selection": _selection,
    "moe": _moe,
    "projection": _projection,
    "control-plane": _control_plane,
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of every run")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="scratch folder for the runs")
    p.add_argument("--variants", nargs="*", choices=[label for label, _ in VARIANTS],
                   help="compression variants to run beside dense (default: all)")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    args = p.parse_args()
    scratch = Path(args.out)
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.time()
    sections = []
    for name in args.sections:
        print(f"== bench section: {name}", flush=True)
        sections.append(SECTIONS[name](scratch, args))
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "wall_time_s": round(time.time() - started)}
    (ROOT / "BENCHMARKS.json").write_text(json.dumps({"env": env, "sections": [s["data"] for s in sections]},
                                                     indent=2))
    md = ["# Benchmarks", "",
          f"Written by `make bench` on {env['date']} ({env['cpus']} CPUs, {env['machine']}, Python {env['python']}); "
          f"the whole run took {env['wall_time_s']} s. Figures in one table come from one run, side by side.", ""]
    for s in sections:
        md += s["markdown"] + [""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
