"""Integration: the real entry point on a real Ray cluster, 2 workers, the demo's compression
(local steps with a top-k + error-feedback outer sync).

One chain of runs on the tiny spec (each a separate `python -m jobs.train` process):
  A: 2 workers, steps 0 -> 30 (checkpoints at 10, 20, 30)
  B: A's folder rerun with steps=70 on 2 workers: resumes at 30 (the reference continuation); once
     it has logged step 40 it is asked for a checkpoint now (no periodic one is due), and trains on
  C: a copy of A taken before B, run with steps=70 on 2 workers with expert_parallel=2 (EP 1 -> 2)
B runs with --verbose and logs every step. Apart from the chain, a run whose workers raise. A starts
its own embedded cluster, as a user's run does; B, C and the failing run join one cluster of this
module (RAY_ADDRESS), as drivers under `ray job submit` or the control plane do, which spares each
a cluster's start and stop. Resizes across world sizes (2 -> 1 -> 2, through the API) are in
tests/integration/orchestrator/test_ray_jobs.py, a node loss (2 -> 1) in tests/integration/training/test_elastic.py.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from tests.conftest import DEMO, ROOT, TINY, run_train
from workers.control import ControlChannel
from workers.progress import ProgressRecord, parse_progress

pytestmark = pytest.mark.ray

# A resumed run's loss over its first logged window may differ from the uninterrupted run's by
# this much (relative): different batches (data order, global batch size after a resize), same
# weights, optimizer moments and residuals. A run that lost its state restarts near 5.5 instead.
CONTINUATION_RTOL = 0.10

RUN_TIMEOUT_S = 420
# B's and C's length, and the step after whose record B is asked for a checkpoint now: past the
# losses C is compared at (35, 40), with ~30 steps left for the request to land while B runs.
B_STEPS, ASK_AT = 70, 40
# Output of Ray's processes that reaches the driver only with --verbose.
RAY_CHATTER = ("(RayTrainWorker", "(TrainController", "(SplitCoordinator", "(DatasetManager", "(raylet)",
               "Reporting training result", "core_worker", "RayDeprecationWarning", "Started a local Ray instance")


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _env(address: str | None) -> dict[str, str]:
    """The driver's environment: an embedded cluster (no address) or the one at ``address``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | ({"RAY_ADDRESS": address} if address else {})


def _run(*args: str, address: str | None = None) -> subprocess.CompletedProcess:
    if address is None:
        return run_train(*args)
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=_env(address), text=True,
                          capture_output=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster_address(train_ray) -> str:
    """The GCS address of the module's cluster (``train_ray``), for the drivers that join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def _train(out, *sets, sample=False, verbose=False, address=None):
    args = ["--spec", str(DEMO), "--out", str(out), *([] if sample else ["--no-sample"]),
            *(["--verbose"] if verbose else [])]
    r = _run(*args, *_sets(*TINY, "train.checkpoint_every=10", *sets), address=address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = {p["step"]: p["loss"] for p in map(parse_progress, r.stdout.splitlines()) if p}
    return r, losses, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, shards_dir):
    out = tmp_path_factory.mktemp("a")
    r, losses, summary = _train(out, f"data.path={shards_dir}", "train.steps=30", sample=True)
    snapshot = tmp_path_factory.mktemp("c") / "run"
    shutil.copytree(out, snapshot)  # before B moves A's folder on
    return out, snapshot, r, losses, summary


@pytest.fixture(scope="module")
def run_b(run_a, shards_dir, cluster_address):
    """B, read as it runs: a "checkpoint now" request (workers/control.py) is written once step
    ASK_AT is logged. The request asks for a short hold (what a stopping controller asks for): no
    stop comes, so the loop trains on after it and the run ends whole. Periodic checkpoints are off,
    so the request's checkpoint is the only one before the end (and kept: keep_checkpoints 2)."""
    out = run_a[0]
    args = ["--spec", str(DEMO), "--out", str(out), "--no-sample", "--verbose",
            *_sets(*TINY, f"data.path={shards_dir}", f"train.steps={B_STEPS}", "train.log_every=1",
                   "train.checkpoint_every=1000")]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=_env(cluster_address), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    channel, request, asked_after, output = ControlChannel(out), None, None, []
    watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)  # a hung run ends the read loop
    watchdog.start()
    try:
        for line in proc.stdout:
            output.append(line)
            record = ProgressRecord.from_line(line)
            if record is not None and request is None and record.step >= ASK_AT:
                request, asked_after = channel.request_checkpoint("test: checkpoint now", hold_s=2.0), record.step
        assert proc.wait(timeout=60) == 0, "".join(output)[-3000:]
    finally:
        watchdog.cancel()
        proc.kill()
    text = "".join(output)
    losses = {p["step"]: p["loss"] for p in map(parse_progress, text.splitlines()) if p}
    return text, losses, json.loads((out / "summary.json").read_text()), channel, request, asked_after


def _window_means(losses: dict[int, float], ends: tuple[int, ...], width: int = 5) -> dict[int, float]:
    """The loss a log_every=``width`` run logs at each of ``ends`` (its window's mean), from one logged per step."""
    return {end: sum(losses[s] for s in range(end - width + 1, end + 1)) / width for end in ends}


def test_loss_decreases_with_the_demo_compression_on_two_workers(run_a):
    _, _, r, losses, summary = run_a
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert summary["world_size"] == 2 and summary["steps"] == 30
    # from ~5.5 (uniform over bytes) downwards: 30 tiny steps take off about 0.5 after step 5 (0.508
    # and 0.496 on the two shard layouts this data has had)
    assert summary["final_loss"] < losses[5] - 0.4
    assert summary["eval_loss"] is not None and summary["eval_loss"] < losses[5]
    # Byte accounting: 3% of each chunk every 4 steps, at about 1.8 bytes per sent entry (12-bit index,
    # 2-bit value, a scale per chunk) against 4 fp32 ring allreduces: about 300x at world size 2 on the
    # demo model; the tiny model pads its last chunk, so less here, and still far above per-step top-k's 50x.
    assert summary["wire_bytes"] > 0 and summary["dense_bytes"] / summary["wire_bytes"] >= 100
    assert summary["compression"] == pytest.approx(summary["dense_bytes"] / summary["wire_bytes"])
    assert len(summary["moe"]["max_vio"]) == 1 and summary["moe"]["drop_frac"][0] >= 0
    assert len(summary["samples"]) == 3 and summary["samples"][0].startswith("def ")
    output = r.stdout + r.stderr
    assert [noise for noise in RAY_CHATTER if noise in output] == []
    assert sum(line.startswith("[progress] ") for line in r.stdout.splitlines()) == 6  # from the driver, once each


def test_rerun_with_same_out_resumes_from_latest_checkpoint(run_a, run_b):
    text, losses, summary, *_ = run_b
    assert "resuming from step 30 (saved by 2 workers, EP 1; now 2 workers, EP 1)" in text
    assert sorted(losses) == list(range(31, B_STEPS + 1))
    assert summary["steps"] == B_STEPS and summary["wire_bytes"] > run_a[4]["wire_bytes"]  # totals carried on
    assert "(RayTrainWorker pid=" in text  # --verbose: the workers' own logs too


def test_expert_parallel_1_to_2_continues_the_curve(run_a, run_b, shards_dir, cluster_address):
    snapshot = run_a[1]  # A's folder as it was before B moved it on
    r, losses, summary = _train(snapshot, f"data.path={shards_dir}", f"train.steps={B_STEPS}",
                                "resources.num_workers=2", "resources.expert_parallel=2", address=cluster_address)
    assert "resuming from step 30 (saved by 2 workers, EP 1; now 2 workers, EP 2)" in r.stdout
    assert summary["world_size"] == 2 and summary["steps"] == B_STEPS
    # B logs every step: its 5-step means are what C logs (log_every 5), before B's request at ASK_AT.
    reference = _window_means(run_b[1], (35, 40))
    for step in (35, 40):
        assert losses[step] == pytest.approx(reference[step], rel=CONTINUATION_RTOL)
    assert summary["dense_bytes"] / summary["wire_bytes"] >= 40  # experts synced over no replica: 0 bytes


def test_failing_workers_error_reaches_the_user_without_verbose(tmp_path, shards_dir, cluster_address):
    # No batch of that size fits this corpus: each worker raises on its first step.
    args = ["--spec", str(DEMO), "--out", str(tmp_path), "--no-sample"]
    r = _run(*args, *_sets(*TINY, f"data.path={shards_dir}", "train.batch_size=65536", "resources.max_failures=0"),
             address=cluster_address)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    # Every rank reads the one training order (exactly-once data), so the error names the global batch;
    # the ranks that failed first are named (one or both, by timing).
    assert re.search(r"error: training failed on worker (0|1|0,1): RuntimeError: the training data yields no "
                     r"global batch of 131072 sequences", r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "(RayTrainWorker" not in r.stdout + r.stderr


def test_checkpoint_now_request_is_honoured_within_a_step(run_a, run_b):
    """B was asked for a checkpoint once it had logged step ASK_AT: the loop checkpoints at the end of
    the step in flight and confirms; no periodic checkpoint is due. After the hold it trains on."""
    text, _, summary, channel, request, asked_after = run_b
    out = run_a[0]
    assert request is not None, text[-3000:]
    done = channel.confirmation(request)
    assert done is not None and done.reason == "test: checkpoint now"
    # Rank 0 polls after every step, after reporting it: a request that lands between the report the
    # driver printed and that poll is honoured at that same step. The display lags by a few records.
    assert asked_after <= done.step <= asked_after + 5 < B_STEPS
    assert (out / "ray-train" / f"step-{done.step:08d}" / "meta.json").exists()
    assert f"checkpoint at step {done.step} on request (test: checkpoint now)" in text
    assert summary["steps"] == B_STEPS  # the hold ended, training went on
