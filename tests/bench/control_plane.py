"""Control-plane benchmark: POST /v1/jobs latency and throughput, and POST -> RUNNING on a real cluster.

``run_bench()`` returns the figures as a dict and prints a markdown table; ``python -m tests.bench
--sections control-plane`` records them in BENCHMARKS.md, ``python -m tests.bench.control_plane`` only
prints them. Every phase is bounded (a fixed count, a fixed time), then stops.

1. Latency: the API alone (controller off, so Ray submission is excluded) in its own process on
   loopback; ``requests`` POSTs of the demo spec from ``concurrency`` keep-alive clients.
2. Sustained: the same, for ``sustain_s`` seconds or ``sustain_max`` submissions, whichever first.
3. POST -> RUNNING: a local Ray head and the full service; the demo job is submitted, timed until Ray
   reports its driver RUNNING, then cancelled. Repeated ``demo_runs`` times.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import BackgroundServer, free_port, wait_until_healthy
from workers.waiting import wait_until

TOKEN = "bench-token-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEMO = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "demo.yaml"
SERVER_START_TIMEOUT_S = 60.0
RUNNING_TIMEOUT_S = 300.0
RUNNING_POLL_S = 0.02  # the figure is POST -> RUNNING: poll finely
CANCELLED_POLL_S = 0.1
WARMUP_REQUESTS = 50


def _demo_body() -> dict[str, Any]:
    from jobs.specs.train import load_spec

    return {"spec": load_spec(DEMO).model_dump(mode="json"), "max_retries": 0}


def _start_api(state_dir: Path, port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_API_TOKEN=TOKEN, ORCH_STATE_DIR=str(state_dir), ORCH_CONTROLLER_ENABLED="false", **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "orchestrator.api.app:app_from_env", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    wait_until_healthy(proc, f"http://127.0.0.1:{port}", lambda: proc.stderr.read().decode(),
                       timeout_s=SERVER_START_TIMEOUT_S)
    return proc


def _request_bytes(port: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


async def _post_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _load(port: int, body: dict, concurrency: int, max_requests: int, max_s: float) -> dict[str, Any]:
    """POST until max_requests are done or max_s has passed, over ``concurrency`` keep-alive connections.

    The client is a few lines over asyncio streams with the request pre-encoded: an HTTP library spends
    several ms of CPU per request, which on a small machine measures the client, not the service."""
    request = _request_bytes(port, body)
    latencies: list[float] = []
    errors = 0
    issued = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s

    async def worker() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while issued < max_requests and loop.time() < deadline:
                issued += 1
                t = time.perf_counter()
                try:
                    ok = await asyncio.wait_for(_post_once(reader, writer, request), 30) == 202
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    return
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "elapsed_s": time.perf_counter() - started}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_api(requests: int = 1000, concurrency: int = 8, sustain_s: float = 10.0, sustain_max: int = 50_000,
              sqlite_synchronous: str = "FULL") -> dict[str, Any]:
    """Latency with one client (no queueing in the figure), then throughput with ``concurrency``."""
    body = _demo_body()
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as d:
        port = free_port()
        proc = _start_api(Path(d), port, {"ORCH_SQLITE_SYNCHRONOUS": sqlite_synchronous})
        try:
            asyncio.run(_load(port, body, concurrency, WARMUP_REQUESTS, 30.0))
            single = asyncio.run(_load(port, body, 1, requests, 600.0))
            sustained = asyncio.run(_load(port, body, concurrency, sustain_max, sustain_s))
            # Every 202 is a stored job: count them back.
            stored = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", params={"limit": 1}, headers=AUTH,
                               timeout=30).json()["count"]
        finally:
            proc.terminate()
            proc.wait(30)
    lat = single["latencies"]
    return {
        "sqlite_synchronous": sqlite_synchronous,
        "post_latency_ms": {
            "p50": 1000 * _pct(lat, 0.50), "p90": 1000 * _pct(lat, 0.90), "p99": 1000 * _pct(lat, 0.99),
            "max": 1000 * max(lat), "requests": len(lat), "errors": single["errors"],
        },
        "sustained": {
            "concurrency": concurrency, "seconds": sustained["elapsed_s"], "submissions": len(sustained["latencies"]),
            "submissions_per_s": len(sustained["latencies"]) / sustained["elapsed_s"], "errors": sustained["errors"],
            "p50_ms": 1000 * _pct(sustained["latencies"], 0.50), "p99_ms": 1000 * _pct(sustained["latencies"], 0.99),
        },
        "body_bytes": len(json.dumps(body)),
        "stored_jobs": stored,
        "accepted": WARMUP_REQUESTS + len(lat) + len(sustained["latencies"]),
    }


def _time_to_running(c: httpx.Client, body: dict) -> float:
    """Seconds from POST to RUNNING for one job, which is then cancelled (and awaited CANCELLED)."""
    t0 = time.perf_counter()
    job_id = c.post("/v1/jobs", json=body).json()["id"]

    def state() -> str:
        return c.get(f"/v1/jobs/{job_id}").json()["state"]

    def running() -> bool:
        now = state()
        if now in ("FAILED", "CANCELLED", "SUCCEEDED"):
            raise RuntimeError(f"demo job {job_id} ended {now} before RUNNING")
        return now == "RUNNING"

    wait_until(running, timeout_s=RUNNING_TIMEOUT_S, interval_s=RUNNING_POLL_S, what=f"demo job {job_id} to run")
    elapsed_s = time.perf_counter() - t0
    c.post(f"/v1/jobs/{job_id}/cancel")
    wait_until(lambda: state() == "CANCELLED", timeout_s=RUNNING_TIMEOUT_S, interval_s=CANCELLED_POLL_S,
               what=f"demo job {job_id} to be CANCELLED")
    return elapsed_s


def bench_post_to_running(runs: int = 3, num_cpus: int = 4) -> dict[str, Any]:
    """Seconds from POST /v1/jobs of the demo spec to RUNNING (Ray reports the driver running)."""
    from orchestrator.api.app import create_app
    from orchestrator.local.head import LocalRayHead
    from orchestrator.settings import Settings

    body = _demo_body()
    ray_token = "bench-ray-" + "0123456789abcdef" * 2
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as d, \
            LocalRayHead(num_cpus=num_cpus, auth_token=ray_token) as head:
        settings = Settings(api_token=TOKEN, state_dir=Path(d), ray_address=head.dashboard_url,
                            ray_auth_token=ray_token, reconcile_interval_s=0.1)
        app = create_app(settings)
        with BackgroundServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            times = [_time_to_running(c, body) for _ in range(runs)]
        app.state.store.close()
    return {"runs_s": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def markdown(results: dict[str, Any]) -> str:
    rows = []
    for a in results.get("api", []):
        lat, sus, sync = a["post_latency_ms"], a["sustained"], a["sqlite_synchronous"]
        rows += [
            (f"POST /v1/jobs latency, 1 client, {lat['requests']} requests (synchronous={sync})",
             f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms"),
            (f"sustained, {sus['concurrency']} clients for {sus['seconds']:.0f} s (synchronous={sync})",
             f"{sus['submissions_per_s']:.0f} submissions/s (p50 {sus['p50_ms']:.1f} ms, p99 {sus['p99_ms']:.1f} ms, "
             f"{lat['errors'] + sus['errors']} errors)"),
        ]
    if "post_to_running" in results:
        r = results["post_to_running"]
        runs = ", ".join(f"{t:.2f}" for t in r["runs_s"])
        rows.append(("demo job: POST -> RUNNING, real local Ray (median)", f"{r['median_s']:.2f} s (runs: {runs})"))
    out = ["| control plane (loopback; API rows exclude Ray submission) | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def run_bench(requests: int = 1000, concurrency: int = 8, sustain_s: float = 10.0, demo_runs: int = 3,
              with_ray: bool = True) -> dict[str, Any]:
    """All control-plane figures as a dict; prints the markdown table. The API is measured with the
    default durable store (synchronous=FULL) and with synchronous=NORMAL for comparison."""
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "api": [bench_api(requests, concurrency, sustain_s, sqlite_synchronous=s) for s in ("FULL", "NORMAL")],
    }
    if with_ray and demo_runs > 0:
        results["post_to_running"] = bench_post_to_running(demo_runs)
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sustain-s", type=float, default=10.0)
    p.add_argument("--demo-runs", type=int, default=3)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    res = run_bench(a.requests, a.concurrency, a.sustain_s, a.demo_runs, not a.no_ray)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
