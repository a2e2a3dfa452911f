"""Serving commands: ``orch serve (CHECKPOINT | --job ID) [--name NAME]`` creates a deployment and
prints its URL and bearer key (the key is shown this once; the service keeps only its SHA-256);
``orch deployments`` lists them, ``orch deployments show ID`` / ``delete ID`` inspect and remove one.
Each is a request to /v1/deployments; ``--json`` prints the API's answer as it came.

``--wait`` polls until Serve runs the application (exit 0) or gives up on it (exit 1).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from orchestrator.cli import render
from orchestrator.cli.client import api, check
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError, JsonFlag, api_url, app

WAIT_POLL_S = 1.0  # between two reads of a deployment while waiting for it to run
# Statuses after which waiting is over (DEPLOY_FAILED is retried by the service: keep waiting).
WAIT_DONE = {"RUNNING": 0, "FAILED": EXIT_FAILED}

deployments_app = typer.Typer(help="serving deployments: list, show, delete", no_args_is_help=False,
                              invoke_without_command=True)
app.add_typer(deployments_app, name="deployments")

DeploymentId = Annotated[str, typer.Argument(metavar="ID", help="the deployment's id (orch deployments)")]


@app.command(help="serve a checkpoint (a folder, or a run's output folder: its latest) or a finished job's")
def serve(
    ctx: typer.Context,
    checkpoint: Annotated[str | None, typer.Argument(metavar="[CHECKPOINT]", help="checkpoint or run folder")] = None,
    job: Annotated[str | None, typer.Option("--job", metavar="ID", help="a finished train job's latest checkpoint")] = None,
    name: Annotated[str | None, typer.Option(help="application name and model id (default: the deployment id)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="a serve spec field, e.g. num_cpus=0 or limits.max_tokens=64")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="return once Serve runs it")] = False,
    json_out: JsonFlag = False,
) -> None:
    from jobs.specs import SpecError, apply_override

    if (checkpoint is None) == (job is None):
        raise CliError("give a CHECKPOINT folder or --job ID (one of them)", EXIT_USAGE)
    spec: dict[str, Any] = {} if checkpoint is None else {"checkpoint": checkpoint}
    try:
        for assignment in set_ or []:
            apply_override(spec, assignment)
    except SpecError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    body = {"spec": spec, **({"job_id": job} if job else {}), **({"name": name} if name else {})}
    with api(api_url(ctx)) as c:
        created = check(c.post("/v1/deployments", json=body))  # no retry: a second POST is a second deployment
    if json_out:
        render.print_json(created)
    else:
        print(f"deployment {created['id']} ({created['name']}) of {created['checkpoint']}: {created['status']}\n"
              f"  OpenAI base URL: {created['base_url']}\n"
              f"  API key (shown once, only its SHA-256 is kept): {created['api_key']}")
    if wait:
        _wait(api_url(ctx), created["id"], quiet=json_out)


def _wait(url: str, deployment_id: str, quiet: bool) -> None:
    with api(url) as c:
        while True:
            d = check(c.get(f"/v1/deployments/{deployment_id}"))
            if d["status"] in WAIT_DONE:
                break
            time.sleep(WAIT_POLL_S)
    if not quiet:
        print(f"{deployment_id}: {d['status']}" + (f" ({d['message']})" if d["message"] else ""), file=sys.stderr)
    if WAIT_DONE[d["status"]]:
        raise typer.Exit(WAIT_DONE[d["status"]])


def _rows(data: list[dict[str, Any]]) -> list[list[Any]]:
    return [[d["id"], d["name"], d["team"], render.state(d["status"]),
             " ".join(f"{k}={v}" for k, v in sorted(d["replicas"].items())) or "-", d["base_url"], d["checkpoint"]]
            for d in data]


_HEADERS = ["ID", "NAME", "TEAM", "STATUS", "REPLICAS", "BASE URL", "CHECKPOINT"]


@deployments_app.callback()
def list_deployments(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Without a subcommand: the deployments you may see, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    with api(api_url(ctx)) as c:
        data = check(c.get("/v1/deployments"))
    if json_out:
        render.print_json(data)
    else:
        render.emit(render.table(_HEADERS, _rows(data["data"])))


@deployments_app.command("show", help="one deployment: status, replicas, checkpoint, URL, message")
def show(ctx: typer.Context, deployment_id: DeploymentId, json_out: JsonFlag = False) -> None:
    with api(api_url(ctx)) as c:
        d = check(c.get(f"/v1/deployments/{deployment_id}"))
    if json_out:
        render.print_json(d)
    else:
        render.emit(render.table(_HEADERS, _rows([d])), f"source: {d['source']}   message: {d['message'] or '-'}")


@deployments_app.command("delete", help="remove a deployment (its application stops; the others keep serving)")
def delete(ctx: typer.Context, deployment_id: DeploymentId, json_out: JsonFlag = False) -> None:
    with api(api_url(ctx)) as c:
        d = check(c.delete(f"/v1/deployments/{deployment_id}"))
    if json_out:
        render.print_json(d)
    else:
        print(f"deleting {deployment_id} ({d['name']}): {d['status']}")
