"""Integration: ``compression.method: local`` through the real entry point (``python -m jobs.train``)
on an embedded Ray cluster. A 2-worker run is killed (the driver and its cluster, SIGKILL) after a
checkpoint, mid-round; the same folder is rerun on 3 workers, resumes from that checkpoint and
finishes. The summary's byte counters must equal the byte model of workers/compression/DESIGN.md
("Local steps") replayed over the two attempts: every step counted against a dense ring allreduce,
every sync (dense warm-up, rounds of H steps, the short rounds a checkpoint closes) at its payload.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import DEMO, ROOT, TINY, run_train
from workers.compression import chunks, dense_allreduce_bytes
from workers.config import ModelConfig
from workers.moe.model import MoETransformer
from workers.progress import parse_progress

pytestmark = pytest.mark.ray

STEPS, H, CHECKPOINT_EVERY, WARMUP, DENSITY, BITS = 40, 3, 8, 2, 0.05, 2
LOCAL = ["compression.method=local", f"compression.local_steps={H}", f"compression.density={DENSITY}",
         f"compression.value_bits={BITS}", f"compression.warmup_steps={WARMUP}", "compression.precondition=none",
         "compression.clip_norm=null", "train.grad_clip=1.0", f"train.steps={STEPS}",
         f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=4"]
KILL_AFTER = 16  # the first attempt is killed once this step's checkpoint is on disk
RUN_TIMEOUT_S = 300


def _args(out, shards, *sets: str) -> list[str]:
    pairs = [*TINY, f"data.path={shards}", *LOCAL, *sets]
    return ["--spec", str(DEMO), "--out", str(out), "--no-sample", *(a for p in pairs for a in ("--set", p))]


def _kill_after_checkpoint(out, shards) -> str:
    """The first attempt on 2 workers, killed with its cluster once step KILL_AFTER's checkpoint exists."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = out.parent / "first.log"
    marker = out / "ray-train" / f"step-{KILL_AFTER:08d}" / "meta.json"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *_args(out, shards)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) first: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started
        proc.wait()
    return log.read_text()


def _expected_bytes(n: int, resumed_at: int) -> tuple[int, int]:
    """(wire, dense) totals over all ranks: the loop's syncs replayed, world 2 before the resume, 3 after."""
    k, c = chunks.per_chunk(DENSITY), chunks.chunks_for(n)
    payload = chunks.payload_bytes(c, k, BITS)
    wire = dense = round_steps = 0
    for step in range(STEPS):
        world = 2 if step < resumed_at else 3
        dense += world * dense_allreduce_bytes(n, 4, world)
        round_steps += 1
        done = step + 1
        if step < WARMUP:
            wire += world * dense_allreduce_bytes(n + 1, 4, world)
        elif round_steps == H or done % CHECKPOINT_EVERY == 0 or done == STEPS:
            assert world * payload < 2 * (n + 1) * 4  # the sparse payload pays at this size
            wire += world * (world - 1) * payload
        else:
            continue
        round_steps = 0
    return wire, dense


def test_local_mode_survives_a_kill_and_resumes_on_another_world_size(tmp_path, shards_dir):
    out = tmp_path / "run"
    first = _kill_after_checkpoint(out, shards_dir)
    assert "compression local" in first

    r = run_train(*_args(out, shards_dir, "resources.num_workers=3"), timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"resuming from step (\d+) \(saved by 2 workers, EP 1; now 3 workers, EP 1\)", r.stdout)
    assert m, r.stdout[-3000:]
    resumed_at = int(m.group(1))
    assert resumed_at >= KILL_AFTER and resumed_at % CHECKPOINT_EVERY == 0
    losses = {p["step"]: p["loss"] for p in map(parse_progress, r.stdout.splitlines()) if p and "loss" in p}
    assert min(losses) > resumed_at and max(losses) == STEPS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 3 and summary["method"] == "local"
    # Learned and kept what it learned across the kill: below the byte-uniform ~5.5 it starts from.
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < 4.5
    assert math.isfinite(summary["eval_loss"]) and summary["eval_loss"] < 4.5

    model = MoETransformer(ModelConfig.model_validate(summary["spec"]["model"]))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad and p.is_floating_point())
    wire, dense = _expected_bytes(n, resumed_at)
    assert (summary["wire_bytes"], summary["dense_bytes"]) == (wire, dense)
    assert summary["compression"] == pytest.approx(dense / wire)
    assert dense / wire > 15  # H 3, 5% of each chunk at ~2.3 bytes an entry, a dense warm-up
