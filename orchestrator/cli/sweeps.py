"""Sweep commands: ``orch sweep SPEC [--follow]`` submits a sweep, ``orch trials ID [--follow]`` shows
its trials, ``orch stop-trial ID TRIAL`` stops one of them (``orch cancel ID`` stops the whole sweep).
Each is a request to /v1/sweeps; ``--json`` prints the API's answer as it came.

``--follow`` redraws the trial table (on a terminal) or prints one line per change of a trial (off
one) until the sweep ends; it exits 0 only if the sweep SUCCEEDED.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated, Any

import typer

from orchestrator.cli import render
from orchestrator.cli.client import OrchClient, connect
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError, JsonFlag, app
from orchestrator.cli.jobs import EXIT_INTERRUPTED
from orchestrator.states import JobState
from workers.waiting import wait_until

FOLLOW_POLL_S = 2.0  # between two reads of the sweep while following (trials report every few seconds at best)

SweepId = Annotated[str, typer.Argument(metavar="ID", help="the sweep's id (orch sweep prints it)")]
FollowFlag = Annotated[bool, typer.Option("--follow", "-f", help="watch the trials until the sweep ends")]


@app.command(help="submit a sweep spec (YAML or JSON), e.g. jobs/examples/sweep.yaml")
def sweep(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="e.g. jobs/examples/sweep.yaml")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="override a spec field, e.g. base.train.steps=60 (repeatable)")] = None,
    max_retries: Annotated[int, typer.Option(help="new attempts after a lost driver (0-10); each resumes")] = 2,
    follow: FollowFlag = False,
    json_out: JsonFlag = False,
) -> None:
    from jobs.specs.base import SpecError
    from jobs.specs.sweep import load_sweep_spec  # validated here, before anything is sent

    try:
        loaded = load_sweep_spec(spec, set_ or [])
    except SpecError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    api = connect(ctx)
    created = api.submit_sweep({"spec": loaded.model_dump(mode="json"), "max_retries": max_retries})
    if not follow:
        render.show(created, json_out, _submitted)
        return
    print(_submitted(created), file=sys.stderr)
    _follow(api, created["id"], json_out)


def _submitted(s: dict[str, Any]) -> str:
    return f"submitted sweep {s['id']} ({s['name']}): {s['state']}, {s['trials_total']} trials"


@app.command(help="a sweep's trials: state, parameters, step, metric")
def trials(ctx: typer.Context, sweep_id: SweepId, follow: FollowFlag = False, json_out: JsonFlag = False) -> None:
    if follow:
        _follow(connect(ctx), sweep_id, json_out)
        return
    render.show(connect(ctx).sweep(sweep_id), json_out, sweep_detail)


@app.command("stop-trial", help="stop one trial of a sweep (at its next report)")
def stop_trial(
    ctx: typer.Context, sweep_id: SweepId,
    trial_id: Annotated[str, typer.Argument(metavar="TRIAL", help="the trial's id (orch trials ID)")],
    json_out: JsonFlag = False,
) -> None:
    render.show(connect(ctx).stop_trial(sweep_id, trial_id), json_out,
                lambda _: f"stop requested for trial {trial_id} of sweep {sweep_id}")


def sweep_detail(s: dict[str, Any]) -> list[Any]:
    head = (f"{s['id']} {s['name']}: {s['state']}, {len(s['trials'])}/{s['trials_total']} trials "
            f"({s['search']}, {s['scheduler']}), {s['metric']} {s['mode']}")
    rows = [[t["id"], render.state(t["state"]), f"{t['step']}/{t['total_steps']}", render.fmt(t["last_metric"]),
             render.fmt(t["best_metric"]), " ".join(f"{k}={render.fmt(v)}" for k, v in t["parameters"].items()),
             (t["error"] or "").splitlines()[0] if t["error"] else ""]
            for t in s["trials"]]
    out: list[Any] = [head, render.table(["TRIAL", "STATE", "STEP", "LAST", "BEST", "PARAMETERS", "ERROR"], rows)]
    if s["best"]:
        b = s["best"]
        out.append(f"best: {b['trial_id']} {s['metric']} {render.fmt(b['value'])} at step {b['step']}; "
                   f"checkpoint {b['checkpoint']}")
    return out


def _changes(before: dict[str, tuple], s: dict[str, Any]) -> list[str]:
    """One line per trial whose state or step moved since ``before`` (updated in place)."""
    lines = []
    for t in s["trials"]:
        now = (t["state"], t["step"])
        if before.get(t["id"]) != now:
            before[t["id"]] = now
            lines.append(f"trial {t['id']}: {t['state']} step {t['step']}/{t['total_steps']} "
                         f"{s['metric']} {render.fmt(t['last_metric'])}")
    return lines


def _follow(api: OrchClient, sweep_id: str, json_out: bool) -> None:
    """Polls the sweep until it ends (see the module docstring); Ctrl-C stops following, not the sweep.
    Unbounded on purpose, like ``tail -f``: a sweep may run for days, and the person watching ends it."""
    seen: dict[str, tuple] = {}
    live = sys.stdout.isatty() and not json_out

    def ended() -> dict[str, Any] | None:
        s = api.sweep(sweep_id)
        if live:
            sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal, cursor home
            render.emit(*sweep_detail(s))
        elif not json_out:
            for line in _changes(seen, s):
                print(line, flush=True)
        return s if JobState(s["state"]).terminal else None

    try:
        s = wait_until(ended, timeout_s=math.inf, interval_s=FOLLOW_POLL_S, what=f"sweep {sweep_id} to end")
    except KeyboardInterrupt:
        print(f"\nstopped following; the sweep goes on (orch cancel {sweep_id} to stop it)", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if not live:
        render.show(s, json_out, sweep_detail)
    if s["state"] != JobState.SUCCEEDED.value:
        raise typer.Exit(EXIT_FAILED)
