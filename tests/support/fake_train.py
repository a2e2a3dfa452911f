"""A stand-in for ``jobs.train`` with the same command line and output contract, in seconds not minutes.

``python -m tests.support.fake_train --spec FILE --out DIR``: prints one progress line per step
(0.5 s each), keeps ``DIR/checkpoint.json`` (the last finished step) and resumes after it, writes
``DIR/summary.json``, exits 0. Used where a test is about the control plane, not training (crash
restarts, retries across a cluster restart); the end-to-end test runs the real ``jobs.train``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tests.support.fakes import progress_line, summary_json

STEP_S = 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    steps = spec["train"]["steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    print(f"fake_train: {steps} steps, resuming after step {start}" if start else f"fake_train: {steps} steps",
          flush=True)
    loss = 5.0
    for step in range(start + 1, steps + 1):
        time.sleep(STEP_S)
        loss = 5.0 / step
        print(progress_line(step, steps, loss, tokens_per_s=1000.0), flush=True)
        ckpt.write_text(json.dumps({"step": step}))
    (out / "summary.json").write_text(summary_json(final_loss=loss, steps=steps, resumed_from=start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
