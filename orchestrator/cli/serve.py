"""Serving commands: ``orch serve (CHECKPOINT | --job ID) [--name NAME]`` creates a deployment and
prints its URL and bearer key (the key is shown this once; the service keeps only its SHA-256);
``orch deployments`` lists them, ``orch deployments show ID`` / ``delete ID`` inspect and remove one.
Each is a request to /v1/deployments; ``--json`` prints the API's answer as it came.

``--wait`` polls until Serve runs the application (exit 0) or gives up on it (exit 1), at most
``--timeout`` seconds (then exit 1; the deployment goes on).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from orchestrator.cli import render
from orchestrator.cli.client import OrchClient, connect
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError, JsonFlag, app
from workers.waiting import wait_until

WAIT_POLL_S = 1.0  # between two reads of a deployment while waiting for it to run
# --wait's default bound: Serve's start, a replica's runtime env and loading the checkpoint take
# minutes at most; longer means something is stuck, and the person waiting should look.
WAIT_TIMEOUT_S = 600.0
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
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", min=0.0, help="with --wait: give up waiting after this long")] = WAIT_TIMEOUT_S,
    json_out: JsonFlag = False,
) -> None:
    from jobs.specs.base import SpecError, apply_override

    if (checkpoint is None) == (job is None):
        raise CliError("give a CHECKPOINT folder or --job ID (one of them)", EXIT_USAGE)
    spec: dict[str, Any] = {} if checkpoint is None else {"checkpoint": checkpoint}
    try:
        for assignment in set_ or []:
            apply_override(spec, assignment)
    except SpecError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    body = {"spec": spec, **({"job_id": job} if job else {}), **({"name": name} if name else {})}
    api = connect(ctx)
    created = api.create_deployment(body)
    render.show(created, json_out, lambda d: (
        f"deployment {d['id']} ({d['name']}) of {d['checkpoint']}: {d['status']}\n"
        f"  OpenAI base URL: {d['base_url']}\n"
        f"  API key (shown once, only its SHA-256 is kept): {d['api_key']}"))
    if wait:
        _wait(api, created["id"], timeout, quiet=json_out)


def _wait(api: OrchClient, deployment_id: str, timeout_s: float, quiet: bool) -> None:
    last: dict[str, Any] = {}  # the deployment as last read, for the message on a timeout

    def settled() -> dict[str, Any] | None:
        last.update(api.deployment(deployment_id))
        return last if last["status"] in WAIT_DONE else None

    try:
        d = wait_until(settled, timeout_s=timeout_s, interval_s=WAIT_POLL_S,
                       what=lambda: f"deployment {deployment_id} to run; it is {_status(last)}")
    except TimeoutError as e:
        raise CliError(f"{e}; it goes on: orch deployments show {deployment_id}") from None
    if not quiet:
        print(f"{deployment_id}: {_status(d)}", file=sys.stderr)
    if WAIT_DONE[d["status"]]:
        raise typer.Exit(WAIT_DONE[d["status"]])


def _status(d: dict[str, Any]) -> str:
    return d["status"] + (f" ({d['message']})" if d["message"] else "")


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
    render.show(connect(ctx).deployments(), json_out, lambda data: render.table(_HEADERS, _rows(data["data"])))


@deployments_app.command("show", help="one deployment: status, replicas, checkpoint, URL, message")
def show(ctx: typer.Context, deployment_id: DeploymentId, json_out: JsonFlag = False) -> None:
    render.show(connect(ctx).deployment(deployment_id), json_out, lambda d: [
        render.table(_HEADERS, _rows([d])), f"source: {d['source']}   message: {d['message'] or '-'}"])


@deployments_app.command("delete", help="remove a deployment (its application stops; the others keep serving)")
def delete(ctx: typer.Context, deployment_id: DeploymentId, json_out: JsonFlag = False) -> None:
    render.show(connect(ctx).delete_deployment(deployment_id), json_out,
                lambda d: f"deleting {deployment_id} ({d['name']}): {d['status']}")
