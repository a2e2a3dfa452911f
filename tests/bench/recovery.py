"""Recovery benchmark (issue 23): one Ray Train worker SIGKILLed mid-run, Ray Train restarting the
worker group inside the job from the latest checkpoint. Part of the elastic section
(tests/bench/elastic.py); run alone with ``python -m tests.bench.recovery``.

Three runs side by side, each on an embedded 4-CPU cluster of its own: with Ray's defaults, with the
job's settings (jobs/runtime/trainer.py): ``DATA_REQUEST_ENV`` (the workers' data pipelines' resource requests
at Ray Data's AutoscalingCoordinator lapse within 10 s of a worker's death instead of 180 s) and
``TRAIN_POLL_ENV`` (Ray Train's controller polls its workers every 0.5 s instead of 2 s), and between
them the job's settings with torch preloaded into every worker process, as the embedded cluster had
it (a restart's actors each get a new process, which then imports torch before its first call).
Per run: the seconds from the kill to the first step after it, broken down by the times this process sees (the new loop's start, written by each worker as
it enters the loop, then its "resuming from step" note and its first step), and the throughput before
the kill and after the recovery: the median wall time of a step, and the workers' CPU time per step
(tests/support/procs.py), which holds on this loaded machine where wall times move with other processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

from tests.support.procs import cpu_per_step, workers_cpu

REPO = Path(__file__).resolve().parents[2]
STEPS = 110
CHECKPOINT_EVERY = 20
KILL_AFTER = 50  # the kill comes right after this step's record; the job resumes from step 40
WARMUP = 10  # steps after a (re)start left out of the throughput figures
LOOP_STARTS = "loop-starts.jsonl"  # in the job's output folder: one line per worker per loop start
TIMEOUT_S = 900.0
PRELOADED = "job settings, torch preloaded (before)"
IDLE_WORKERS_S = 20  # a new cluster's wait before the job, so the processes Ray starts ahead are up
SETS = [f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
        "train.warmup_steps=5", "train.eval_batches=0", "train.batch_size=8", "model.n_layers=1",
        "model.d_model=64", "model.n_heads=2", "model.expert_hidden=64", "resources.max_failures=2",
        "resources.preemption_check_every=0"]


def timed_loop(config: dict[str, Any]) -> None:
    """The product's loop, after noting when this worker entered it (runs in each Ray Train worker)."""
    from workers.loop import train_loop_per_worker

    with open(Path(config["worker"]["control_dir"]) / LOOP_STARTS, "a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "process_start": _process_start()}) + "\n")
    train_loop_per_worker(config)


def _process_start() -> float:
    """When this process started (UNIX time), from /proc: field 22 of its stat after boot time."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _attempts() -> list[tuple[float, float | None]]:
    """(start, end) UNIX times of the attempts of the latest Ray Train run, from Train's state actor."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    runs = ray.get(actor.get_train_runs.remote())
    latest = max(runs.values(), key=lambda r: r.start_time_ns)
    attempts = ray.get(actor.get_train_run_attempts.remote())[latest.id].values()
    return sorted((a.start_time_ns / 1e9, a.end_time_ns / 1e9 if a.end_time_ns else None) for a in attempts)


def _fit(spec: Any, out: Path, ray_defaults: bool) -> tuple[list[tuple[float, str, Any, dict]], float, list]:
    """Run the job, killing a worker after step KILL_AFTER: the events as (arrival time, kind,
    payload, workers' CPU then), the kill's time and the run's attempts (``_attempts``)."""
    from ray.util.queue import Queue

    import jobs.runtime.trainer as trainer_module
    from jobs.runtime.trainer import build_trainer
    from workers.data import build_shards
    from workers.progress import PROGRESS

    queue = Queue()
    saved = trainer_module.DATA_REQUEST_ENV
    if ray_defaults:  # runs first: the job's settings are not yet in this process's environment
        trainer_module.DATA_REQUEST_ENV = {}
    try:
        trainer = build_trainer(spec, build_shards(spec.data, lambda msg: None), out, progress=queue,
                                train_loop=timed_loop)
    finally:
        trainer_module.DATA_REQUEST_ENV = saved
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()
    events, killed_at, deadline = [], 0.0, time.monotonic() + TIMEOUT_S
    while (thread.is_alive() or not queue.empty()) and time.monotonic() < deadline:
        try:
            kind, payload = queue.get(timeout=1.0)
        except Empty:
            continue
        events.append((time.time(), kind, payload, workers_cpu() if kind == PROGRESS else {}))
        if kind == PROGRESS and payload.step == KILL_AFTER and not killed_at:
            os.kill(min(events[-1][3]), signal.SIGKILL)
            killed_at = time.time()
    thread.join(timeout=5)
    if "result" not in outcome:
        raise RuntimeError("the benchmark job did not finish (see the Ray session's logs)")
    return events, killed_at, _attempts()


def _median_step_s(records: list[tuple[float, int]], first: int, last: int) -> float:
    at = dict((step, t) for t, step in records)
    return statistics.median(at[s + 1] - at[s] for s in range(first, last) if s in at and s + 1 in at)


def measure(scratch: Path, ray_defaults: bool) -> dict:
    from jobs.specs.train import load_spec
    from workers.progress import NOTE, PROGRESS

    spec = load_spec(REPO / "jobs" / "examples" / "demo.yaml", SETS)
    out = scratch / ("ray-defaults" if ray_defaults else "job-settings")
    out.mkdir(parents=True, exist_ok=True)
    events, killed_at, attempts = _fit(spec, out, ray_defaults)
    cut = next(i for i, (_, kind, p, _) in enumerate(events) if kind == PROGRESS and p.step == KILL_AFTER) + 1
    before = [(t, p.step) for t, kind, p, _ in events[:cut] if kind == PROGRESS]
    after = [(t, p.step) for t, kind, p, _ in events[cut:] if kind == PROGRESS]
    resumed = next(t for t, kind, p, _ in events[cut:] if kind == NOTE and "resuming from step" in p)
    starts = [json.loads(line) for line in (out / LOOP_STARTS).read_text().splitlines()]
    loop_start = min(s["t"] for s in starts if s["t"] > killed_at)
    process_start = min(s["process_start"] for s in starts if s["t"] > killed_at)
    (_, failed_at), (next_attempt, _) = attempts[-2], attempts[-1]  # the killed attempt, the one after
    restart = KILL_AFTER - KILL_AFTER % CHECKPOINT_EVERY
    cpu_before = cpu_per_step([(p.step, c) for _, k, p, c in events[:cut] if k == PROGRESS], WARMUP, KILL_AFTER)
    cpu_after = cpu_per_step([(p.step, c) for _, k, p, c in events[cut:] if k == PROGRESS], restart + WARMUP, STEPS)
    step_before = _median_step_s(before, WARMUP, KILL_AFTER)
    step_after = _median_step_s(after, restart + WARMUP, STEPS)
    return {"settings": "Ray defaults" if ray_defaults else "job settings",
            "kill_to_attempt_end_s": round(failed_at - killed_at, 1),
            "attempt_end_to_next_attempt_s": round(next_attempt - failed_at, 1),
            "next_attempt_to_process_start_s": round(process_start - next_attempt, 1),
            "process_start_to_loop_s": round(loop_start - process_start, 1),
            "kill_to_loop_start_s": round(loop_start - killed_at, 1),
            "loop_start_to_resumed_s": round(resumed - loop_start, 1),
            "resumed_to_first_step_s": round(after[0][0] - resumed, 1),
            "kill_to_first_step_s": round(after[0][0] - killed_at, 1),
            "step_ms_before": round(step_before * 1000), "step_ms_after": round(step_after * 1000),
            "throughput_after_over_before": round(step_before / step_after, 2),
            "cpu_ms_per_step_before": round(cpu_before * 1000), "cpu_ms_per_step_after": round(cpu_after * 1000),
            "cpu_after_over_before": round(cpu_after / cpu_before, 2)}


@contextlib.contextmanager
def preloading(modules: list[str]) -> Any:
    """Every ``ray.init`` here starts its cluster with ``modules`` preloaded into each worker process
    (Ray's preload_python_modules): jobs.runtime.trainer.init_ray as it was before issue 23's cut."""
    import ray

    real = ray.init

    def init(*args: Any, _system_config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return real(*args, _system_config={**(_system_config or {}), "preload_python_modules": modules}, **kwargs)

    ray.init = init
    try:
        yield
    finally:
        ray.init = real


def _run_on_cluster(scratch: Path, ray_defaults: bool) -> dict:
    """One run on an embedded cluster of its own (4 CPUs: 2 workers and Ray Data's tasks): Ray's
    defaults, or the one jobs.train starts (jobs/runtime/trainer.py ``init_ray``)."""
    import ray

    from jobs.runtime.trainer import init_ray
    from jobs.specs.train import load_spec

    if ray_defaults:
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    else:
        init_ray(load_spec(REPO / "jobs" / "examples" / "demo.yaml", SETS), verbose=False)
    try:
        time.sleep(IDLE_WORKERS_S)
        return measure(scratch, ray_defaults)
    finally:
        ray.shutdown()


def recovery_rows(scratch: Path) -> list[dict]:
    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"  # the attempts' times (``_attempts``), read by fit()
    rows = [_run_on_cluster(scratch, ray_defaults=True)]  # first: the job's settings enter this environment
    with preloading(["torch"]):  # the job's settings as they were, torch preloaded into every worker
        rows.append({**_run_on_cluster(scratch / "preloaded", ray_defaults=False), "settings": PRELOADED})
    return [*rows, _run_on_cluster(scratch, ray_defaults=False)]


def markdown(rows: list[dict]) -> list[str]:
    return ["### Recovery from a killed worker", "",
            "A 2-worker demo job (1-layer model, the demo's corpus), one `RayTrainWorker` SIGKILLed after step "
            f"{KILL_AFTER}; Ray Train restarts the worker group inside the job from the step-"
            f"{KILL_AFTER - KILL_AFTER % CHECKPOINT_EVERY} checkpoint. The seconds from the kill to the next step: "
            "kill -> attempt end (failure detection: Train's poll of its workers, and the old group's teardown; "
            "Train's run state), -> next attempt (Train's restart decision), -> worker process start (placement, "
            "actor creation; a process Ray started ahead shows a negative figure), -> loop start (imports of Ray "
            "Train, torch and the loop, actor set-up, the process group), -> resumed (model build, checkpoint "
            "load), -> first step (the data pipeline's start, the first batch, the step). Throughput: median wall time of a step "
            f"(steps {WARMUP}-{KILL_AFTER} before, {KILL_AFTER - KILL_AFTER % CHECKPOINT_EVERY + WARMUP}-{STEPS} "
            "after) and the workers' CPU time per step (holds on a loaded machine). Ray defaults: dead workers' "
            "Ray Data requests kept 180 s, Train polls its workers every 2 s; job settings: the requests lapse "
            "within 10 s, polls every 0.5 s (jobs/runtime/trainer.py `DATA_REQUEST_ENV`, `TRAIN_POLL_ENV`); with torch "
            "preloaded: the same and every worker process imports torch before its first call (Ray's "
            "preload_python_modules, the embedded cluster's setting before issue 23's second cut).", "",
            "| settings | kill -> attempt end (s) | -> next attempt (s) | -> process start (s) | -> loop start (s) "
            "| -> resumed (s) | -> first step (s) | kill -> first step (s) | step before (ms) | step after (ms) | "
            "throughput after / before | CPU/step before (ms) | CPU/step after (ms) | CPU after / before |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['settings']} | {r['kill_to_attempt_end_s']} | {r['attempt_end_to_next_attempt_s']} | "
              f"{r['next_attempt_to_process_start_s']} | {r['process_start_to_loop_s']} | {r['loop_start_to_resumed_s']} | "
              f"{r['resumed_to_first_step_s']} | {r['kill_to_first_step_s']} | {r['step_ms_before']} | "
              f"{r['step_ms_after']} | {r['throughput_after_over_before']} | {r['cpu_ms_per_step_before']} | "
              f"{r['cpu_ms_per_step_after']} | {r['cpu_after_over_before']} |" for r in rows], ""]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = recovery_rows(Path(tmp))
    print(json.dumps(rows, indent=1))
    print("\n".join(markdown(rows)))
