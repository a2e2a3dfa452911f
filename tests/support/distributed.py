"""Run named scenarios on N gloo ranks in spawned processes: loopback only, bounded in time.

A test module defines ``SCENARIOS = {name: fn(rank) -> picklable}`` at module level and calls
``run_scenarios(__name__, ...)``; every rank runs every scenario in one process group (start-up is
the expensive part), a barrier after each so one failure cannot desynchronise the next, and
``scenario_values`` turns a failed scenario into that test's failure with the rank's traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def _rank_main(rank: int, module: str, world: int, collective_timeout_s: float, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo picks its interface from the hostname otherwise
    torch.set_num_threads(1)
    scenarios = importlib.import_module(module).SCENARIOS
    store = dist.FileStore(str(Path(tmp) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    results: dict[str, dict] = {}
    try:
        for name, scenario in scenarios.items():
            start = time.perf_counter()
            try:
                results[name] = {"ok": True, "value": scenario(rank)}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - start  # for reading runs, not asserted
            dist.barrier()
    finally:
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
        dist.destroy_process_group()


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set, restored after; spawned children copy it when they start."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_scenarios(module: str, tmp: Path, world: int, collective_timeout_s: float,
                  join_timeout_s: float, env: dict[str, str] | None = None) -> list[dict]:
    """Every rank's {scenario: {"ok", "value" | "error", "seconds"}}; hung ranks are killed.

    ``env`` is set in the ranks' environment from their start (variables that torch, MKL or gloo
    read once, when first used).
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(rank, module, world, collective_timeout_s, str(tmp)), daemon=True)
             for rank in range(world)]
    with _environ(env or {}):
        for proc in procs:
            proc.start()
    for proc in procs:
        proc.join(timeout=join_timeout_s)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    if hung:
        raise RuntimeError(f"{len(hung)} rank(s) still running after {join_timeout_s} s; killed")
    codes = [proc.exitcode for proc in procs]
    files = [tmp / f"rank{rank}.pt" for rank in range(world)]
    if any(code != 0 for code in codes) or not all(f.exists() for f in files):
        raise RuntimeError(f"ranks exited with codes {codes}")
    return [torch.load(f, weights_only=False) for f in files]


def scenario_values(results: list[dict], name: str) -> list:
    """Each rank's value of one scenario; the test fails with the rank's traceback if it raised."""
    for rank, by_name in enumerate(results):
        if not by_name[name]["ok"]:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{by_name[name]['error']}")
    return [by_name[name]["value"] for by_name in results]


def results_fixture(module: str, world: int, collective_timeout_s: float, join_timeout_s: float):
    """A module-scoped ``dist_results`` fixture running ``module``'s SCENARIOS once."""

    @pytest.fixture(scope="module")
    def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
        try:
            return run_scenarios(module, tmp_path_factory.mktemp(module.rpartition(".")[2]), world,
                                 collective_timeout_s, join_timeout_s)
        except RuntimeError as e:
            pytest.fail(str(e))

    return dist_results
