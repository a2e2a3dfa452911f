"""Scheduler benchmark: one scheduling pass over a large queue, on a fake cluster (no Ray, no store).

``python -m tests.bench --sections scheduler``. The cluster: 64 GPU nodes (8 x A100) in one pool,
32 NPU nodes (8 each), 16 CPU nodes (64 CPUs); 10,000 queued jobs from 20 teams in three priority
classes, 1-8 devices each, with per-team quotas and 200 jobs already running. Figures: the pass's
wall time (median of repeats) and queued jobs decided per second; how many it admitted.
"""

from __future__ import annotations

import random
import statistics
import time

from orchestrator.ray_client import NodeView
from orchestrator.scheduler.pools import build_pools
from orchestrator.scheduler.schedule import schedule_pass
from orchestrator.scheduler.views import PRIORITIES, JobView

QUEUED_JOBS = 10_000
RUNNING_JOBS = 200
TEAMS = 20
REPEATS = 5
SEED = 0


def _cluster() -> list[NodeView]:
    nodes = [NodeView(f"g{i}", "10.0.0.1", False, "ALIVE", {"CPU": 96.0, "GPU": 8.0},
                      {"ray.io/accelerator-type": "A100"}) for i in range(64)]
    nodes += [NodeView(f"n{i}", "10.0.1.1", False, "ALIVE", {"CPU": 192.0, "NPU": 8.0}) for i in range(32)]
    nodes += [NodeView(f"c{i}", "10.0.2.1", False, "ALIVE", {"CPU": 64.0}) for i in range(16)]
    return nodes


def _job(rng: random.Random, i: int, placed: bool) -> JobView:
    kind = rng.choice(["gpu", "gpu", "npu", "cpu"])
    n = rng.choice([1, 2, 4, 8])
    need = {"CPU": n * 4.0 + 1.0} | ({"GPU": float(n)} if kind == "gpu" else {"NPU": float(n)} if kind == "npu" else {})
    key = {"gpu": "gpu-a100", "npu": "npu", "cpu": "cpu"}[kind] if placed else kind
    return JobView(f"j{i}", f"team{rng.randrange(TEAMS)}", rng.choice(PRIORITIES), float(i), {key: need},
                   {key: key} if placed else {}, preemptible=placed)


def run_bench() -> dict:
    rng = random.Random(SEED)
    pools = build_pools(_cluster())
    running = [_job(rng, i, placed=True) for i in range(RUNNING_JOBS)]
    queued = [_job(rng, RUNNING_JOBS + i, placed=False) for i in range(QUEUED_JOBS)]
    quotas = {f"team{t}": {"gpu": 48.0, "npu": 32.0} for t in range(TEAMS)}
    times, decisions = [], None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        decisions = schedule_pass(pools, queued, running, quotas=quotas)
        times.append(time.perf_counter() - t0)
    pass_s = statistics.median(times)
    return {"queued_jobs": QUEUED_JOBS, "running_jobs": RUNNING_JOBS, "teams": TEAMS, "pass_s": round(pass_s, 4),
            "jobs_decided_per_s": round(QUEUED_JOBS / pass_s), "admitted": len(decisions.admit),
            "preempted": len(decisions.preempt), "waiting": len(decisions.wait),
            "jobs_placed_per_s": round(len(decisions.admit) / pass_s)}


def markdown(r: dict) -> list[str]:
    return ["## Scheduler (one pass, fake cluster)", "",
            f"`python -m tests.bench --sections scheduler`: {r['queued_jobs']:,} queued jobs of {r['teams']} teams "
            f"(three priority classes, per-team quotas), {r['running_jobs']} running, 112 nodes in 3 pools; "
            f"median of {REPEATS} passes.", "",
            "| queued | pass (s) | jobs decided / s | admitted | jobs placed / s | preempted | waiting |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['queued_jobs']:,} | {r['pass_s']} | {r['jobs_decided_per_s']:,} | {r['admitted']} | "
            f"{r['jobs_placed_per_s']:,} | {r['preempted']} | {r['waiting']:,} |"]


def scheduler_section() -> dict:
    results = run_bench()
    return {"data": {"name": "scheduler", **results}, "markdown": markdown(results)}


if __name__ == "__main__":
    print("\n".join(markdown(run_bench())))
