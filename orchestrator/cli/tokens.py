"""Access commands: ``orch token create|list|revoke`` and ``orch team set|show`` (admin only), and
``orch audit`` (an admin sees every entry, a user its team's)."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli import render
from orchestrator.cli.client import connect
from orchestrator.cli.core import EXIT_USAGE, CliError, JsonFlag, app

token_app = typer.Typer(help="user API tokens (admin only)", no_args_is_help=True)
team_app = typer.Typer(help="teams: data roots, quotas and priorities (admin only)", no_args_is_help=True)
app.add_typer(token_app, name="token", rich_help_panel="Access")
app.add_typer(team_app, name="team", rich_help_panel="Access")


def _when(at: float | None) -> str | None:
    return None if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


@token_app.command("create", help="make a token for a user; it is printed once and never again")
def token_create(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="user name")],
    team: Annotated[str, typer.Option(help="the team whose jobs the user sees")],
    role: Annotated[str, typer.Option(
        help="user | admin | scrape (for Prometheus: reads /metrics, every team's series, nothing else)")] = "user",
    json_out: JsonFlag = False,
) -> None:
    render.show(connect(ctx).create_token(user, team, role), json_out, _created)


def _created(t: dict) -> str:
    """The secret alone on stdout (TOKEN=$(orch token create ...)); the rest on stderr."""
    print(f"token {t['id']} for {t['user']} (team {t['team']}, {t['role']}); "
          "store it now, it cannot be shown again:", file=sys.stderr)
    return t["token"]


@token_app.command("list", help="tokens (never their secrets)")
def token_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="revoked tokens too")] = False,
    json_out: JsonFlag = False,
) -> None:
    render.show(connect(ctx).tokens(all_), json_out, lambda data: render.table(
        ["ID", "USER", "TEAM", "ROLE", "CREATED", "BY", "REVOKED"],
        [[t["id"], t["user"], t["team"], t["role"], _when(t["created_at"]), t["created_by"], _when(t["revoked_at"])]
         for t in data["data"]]))


@token_app.command("revoke", help="revoke a token: its requests get 401 from now on")
def token_revoke(ctx: typer.Context, token_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    t = connect(ctx).revoke_token(token_id)
    print(f"revoked {t['id']} ({t['user']}, team {t['team']})")


def _quotas(items: list[str]) -> dict[str, float]:
    quotas = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            devices = float(value)
        except ValueError:
            devices = None
        if not (sep and name) or devices is None:
            raise CliError(f"--quota {item!r}: expected POOL=DEVICES, e.g. gpu=8", EXIT_USAGE)
        quotas[name] = devices
    return quotas


@team_app.command("set", help="set a team's data roots, quotas and/or highest priority (what is not given is kept)")
def team_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="TEAM")],
    root: Annotated[list[str] | None, typer.Option(
        help="a folder or s3:// prefix the team's jobs may use (repeatable; replaces the roots)")] = None,
    no_roots: Annotated[bool, typer.Option("--no-roots", help="remove every root")] = False,
    quota: Annotated[list[str] | None, typer.Option(
        metavar="POOL=DEVICES", help="devices the team may hold in a pool, e.g. gpu=8 (repeatable; replaces)")] = None,
    max_priority: Annotated[str | None, typer.Option(
        help="low | normal | high: the highest priority the team's users may submit at (a new team: normal)")] = None,
    json_out: JsonFlag = False,
) -> None:
    body: dict = {}
    if root or no_roots:
        body["roots"] = [] if no_roots else root
    if quota:
        body["quotas"] = _quotas(quota)
    if max_priority is not None:
        body["max_priority"] = max_priority
    if not body:
        raise CliError("nothing to set: give --root, --no-roots, --quota or --max-priority", EXIT_USAGE)
    render.show(connect(ctx).set_team(name, body), json_out, lambda team: _teams([team]))


@team_app.command("show", help="a team's data roots, quotas and highest priority (every team without TEAM)")
def team_show(ctx: typer.Context, name: Annotated[str | None, typer.Argument(metavar="[TEAM]")] = None,
              json_out: JsonFlag = False) -> None:
    api = connect(ctx)
    if name:
        render.show(api.team(name), json_out, lambda team: _teams([team]))
    else:
        render.show(api.teams(), json_out, lambda data: _teams(data["data"]))


def _teams(teams: list[dict]) -> Table:
    rows = [[t["name"], ", ".join(t["roots"]) or "-",
             ", ".join(f"{k}={render.fmt(v)}" for k, v in sorted(t["quotas"].items())) or "-", t["max_priority"]]
            for t in teams]
    return render.table(["TEAM", "ROOTS", "QUOTAS", "MAX PRIORITY"], rows)


@app.command(rich_help_panel="Access", help="who submitted, cancelled, resized or preempted what, newest first")
def audit(
    ctx: typer.Context,
    team: Annotated[str | None, typer.Option(help="only this team's entries (admin)")] = None,
    limit: Annotated[int, typer.Option(help="most entries to show")] = 50,
    json_out: JsonFlag = False,
) -> None:
    render.show(connect(ctx).audit(team, limit), json_out, lambda data: render.page(render.table(
        ["AT", "ACTOR", "TEAM", "ACTION", "TARGET", "DETAIL"],
        [[_when(e["at"]), e["actor"], e["team"], e["action"], e["target"], e["detail"]] for e in data["data"]]),
        len(data["data"]), data["count"]))
