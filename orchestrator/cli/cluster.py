"""`orch cluster`: the nodes by device, the pools the scheduler sees (capacity, held, free, waiting),
then what each team holds (your own team's only, unless you are an admin): its jobs and its
deployments' replicas apart, so serving shows beside training.

It replaces the `cluster` command of orchestrator/cli/jobs.py (which shows the devices table only).
"""

from __future__ import annotations

from typing import Any

import typer

from orchestrator.cli import render
from orchestrator.cli.client import connect
from orchestrator.cli.core import JsonFlag, app


def _amounts(resources: dict[str, float], only: tuple[str, ...] = ("GPU", "NPU", "CPU")) -> str:
    shown = [f"{k}={render.fmt(resources[k])}" for k in only if resources.get(k)]
    return ", ".join(shown) or "-"


def pool_rows(pools: dict[str, Any]) -> list[list[Any]]:
    return [[name, p["nodes"], _amounts(p["capacity"]), _amounts(p["in_use"]), _amounts(p["reserved"]),
             _amounts(p["free"]), p["queued_jobs"], _amounts(p["queued_demand"])]
            for name, p in sorted(pools.items())]


def team_rows(teams: dict[str, Any]) -> list[list[Any]]:
    return [[name, _amounts(t["jobs"]), _amounts(t["serving"]), t["deployments"], t["queued_deployments"]]
            for name, t in sorted(teams.items())]


@app.command(help="pools (cpu | gpu | npu): capacity, in use, reserved, free, queued demand; nodes by device; "
                  "what each team's jobs and deployments hold")
def cluster(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    render.show(connect(ctx).cluster(), json_out, _detail)


def _detail(data: dict[str, Any]) -> list[Any]:
    devices = [[pool, v["nodes"], ", ".join(f"{r}={render.fmt(a)}" for r, a in sorted(v["resources"].items()))]
             for pool, v in sorted(data["by_device"].items())]
    out: list[Any] = [render.table(["DEVICE", "NODES", "RESOURCES"], devices)]
    if data.get("pools"):
        out += [render.section("pools"),
                render.table(["POOL", "NODES", "CAPACITY", "IN USE", "RESERVED", "FREE", "QUEUED", "QUEUED DEMAND"],
                             pool_rows(data["pools"]))]
    if data.get("teams"):
        out += [render.section("teams"),
                render.table(["TEAM", "JOBS HOLD", "SERVING HOLDS", "DEPLOYMENTS", "QUEUED"], team_rows(data["teams"]))]
    if data.get("unmanaged_jobs"):
        out.append(f"({data['unmanaged_jobs']} Ray job(s) not submitted by the service hold resources; counted "
                   "as in use)")
    return out
