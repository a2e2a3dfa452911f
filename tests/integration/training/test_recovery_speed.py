"""A job that loses a worker comes back as fast as it was (issue 23).

One Ray Train worker is SIGKILLed mid-run; Ray Train restarts the worker group inside the running job
from the latest checkpoint. The test compares the CPU time the job's worker processes spend per step
before the kill and after the recovery, in the same run: a CPU-time measure holds on this shared,
loaded machine, where wall-clock step times move with the other processes' load.

What it guards against: each Ray Data execution in a Train worker registers a resource request with
Ray Data's cluster-wide AutoscalingCoordinator, which splits the CPUs left beside the workers equally
(integer shares) among the live requests. A killed worker never cancels its request, so after a
restart the dead group's requests (kept 180 s by default) shared the two spare CPUs with the new
group's: 2 // 4 = 0 CPUs each. The new pipelines then ran a task only when the loop was starved,
and their scheduling loops, with no task to wait on, spun in the worker process (GIL and CPU taken
from the training thread): ~5x the CPU per step and a third of the throughput until the dead
requests expired. jobs/runtime/trainer.py now lets a request lapse after ``DATA_REQUEST_EXPIRE_S``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from jobs.specs.train import load_spec
from tests.conftest import DEMO
from tests.support.cluster import fit_watching
from tests.support.procs import cpu_per_step, workers_cpu

STEPS = 130
CHECKPOINT_EVERY = 20
KILL_AFTER = 50  # the kill comes after this step is logged; the job resumes from step 40
WARMUP = 10  # steps after a (re)start left out of the measure (first batches, allocator warm-up)
# After recovery the worker processes may spend this much more CPU per step than before (ratio).
# Measured 5.75 before the fix (commit 49c8c39); 0.53, 1.03 and, on a loaded CI machine, 1.29 after.
# CPU time too moves with the machine's load (caches, gloo's waits), so the bound sits between the
# noise and the regression it guards against; the recovery's speed itself is measured by `make bench`.
MAX_CPU_RATIO = 2.0


@pytest.mark.ray
def test_a_job_runs_as_fast_after_a_worker_is_killed_as_before(train_ray, tmp_path):
    from workers.progress import NOTE, PROGRESS

    # The demo's own corpus (the default shard cache): the pipeline lives through the measured steps.
    spec = load_spec(DEMO, [f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
                            "train.warmup_steps=5", "train.eval_batches=0", "train.batch_size=8",
                            "model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.expert_hidden=64",
                            "resources.max_failures=2", "resources.preemption_check_every=0"])
    samples: list[tuple[int, dict[int, float]]] = []  # (step logged, pid -> CPU seconds)
    killed: list[int] = []

    def watch(event: tuple[str, Any]) -> None:
        kind, record = event
        if kind != PROGRESS:
            return
        cpu = workers_cpu()
        samples.append((record.step, cpu))
        if record.step == KILL_AFTER and not killed:
            victim = min(cpu)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    events, result = fit_watching(spec, tmp_path, watch, timeout_s=600)
    assert killed and result.metrics["steps"] == STEPS
    resumed = [text for kind, text in events if kind == NOTE and "resuming from step" in text]
    assert len(resumed) == 1, events  # one restart inside the job, from the checkpoint before the kill
    restart = KILL_AFTER - KILL_AFTER % CHECKPOINT_EVERY
    # The records after the restart repeat steps restart+1..KILL_AFTER: split the samples at the kill.
    cut = [step for step, _ in samples].index(KILL_AFTER) + 1
    before, after = samples[:cut], samples[cut:]
    before_cpu = cpu_per_step(before, WARMUP, KILL_AFTER)
    after_cpu = cpu_per_step(after, restart + WARMUP, STEPS)
    ratio = after_cpu / before_cpu
    print(f"CPU per step before {before_cpu * 1000:.0f} ms, after recovery {after_cpu * 1000:.0f} ms: {ratio:.2f}x")
    assert ratio <= MAX_CPU_RATIO
