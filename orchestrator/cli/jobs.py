"""Client commands: submit, list, status, logs, cancel, scale, cluster. Each is one request (or a log stream)
to the API; ``--json`` prints the API's answer as it came."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from orchestrator.cli import render
from orchestrator.cli.client import OrchClient, connect
from orchestrator.cli.core import EXIT_FAILED, EXIT_USAGE, CliError, JsonFlag, app
from orchestrator.states import JobState

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT: only the following stopped, not the job

JobId = Annotated[str, typer.Argument(metavar="ID", help="the job's id (orch list)")]


@app.command(help="submit a job spec (YAML or JSON) of a kind: train (default), prepare, sweep "
                  "(a serve spec is a deployment: orch serve)")
def submit(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="e.g. jobs/examples/demo.yaml")],
    kind: Annotated[str, typer.Option(help="the job kind (jobs/kinds/): train, prepare, sweep")] = "train",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="override a spec field (repeatable)")] = None,
    max_retries: Annotated[int, typer.Option(help="new attempts after a lost driver (0-10)")] = 2,
    idempotency_key: Annotated[str | None, typer.Option(
        help="resubmitting with the same key returns the same job")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream the logs until the job ends")] = False,
    json_out: JsonFlag = False,
) -> None:
    # The spec is validated here, before anything is sent.
    from jobs.kinds import job_kind
    from jobs.specs.base import SpecError, read_yaml, validate_as

    try:
        if job_kind(kind).serves:
            raise CliError(f"{kind} specs run as deployments: orch serve CHECKPOINT --set KEY=VALUE "
                           "(POST /v1/deployments)", EXIT_USAGE)
        loaded = validate_as(job_kind(kind).spec, read_yaml(spec), set_ or [], kind)
    except (SpecError, ValueError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    body = {"kind": kind, "spec": loaded.model_dump(mode="json"), "max_retries": max_retries}
    api = connect(ctx)
    job = api.submit_job(body, idempotency_key)
    if not follow:
        render.show(job, json_out, _submitted)
        return
    print(_submitted(job), file=sys.stderr)
    _follow(api, job["id"], json_out)


def _submitted(j: dict[str, Any]) -> str:
    return f"submitted {j['id']} ({j['name']}): {j['state']}"


def _follow(api: OrchClient, job_id: str, json_out: bool, tail: int | None = None) -> None:
    """Streams the job's logs until it ends (or the server's ORCH_FOLLOW_MAX_S passes); exits 0 only if
    it SUCCEEDED. The final state goes to stderr (stdout is the logs), or as the job's JSON to stdout
    with ``--json``."""
    try:
        for chunk in api.follow_logs(job_id, tail):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (orch cancel {job_id} to stop it)", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    job = api.job(job_id)
    render.show(job, json_out, lambda j: f"\njob {job_id}: {j['state']} ({j['message']})", file=sys.stderr)
    if job["state"] != JobState.SUCCEEDED.value:
        raise typer.Exit(EXIT_FAILED)


@app.command("list", help="list jobs, newest first")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[list[JobState] | None, typer.Option(help="only jobs in this state (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="most jobs to show")] = 50,
    json_out: JsonFlag = False,
) -> None:
    render.show(connect(ctx).jobs([s.value for s in state or []], limit), json_out, _jobs_page)


def _jobs_page(data: dict[str, Any]) -> list[Any]:
    rows = [_job_row(j) for j in data["data"]]
    return render.page(render.table(["ID", "NAME", "STATE", "ATTEMPTS", "STEP", "LOSS", "AGE", "QUEUE"], rows),
                       len(rows), data["count"])


def _job_row(j: dict[str, Any]) -> list[Any]:
    m = j["metrics"] or {}
    return [j["id"], j["name"], render.state(j["state"]), j["attempts"],
            f"{m.get('step', '-')}/{m.get('total_steps', '-')}", render.fmt(m.get("loss", "-")),
            render.age(j["created_at"]), render.queue(j)]


@app.command(help="one job: state, history, attempts, metrics")
def status(ctx: typer.Context, job_id: JobId, json_out: JsonFlag = False) -> None:
    render.show(connect(ctx).job(job_id), json_out, render.job_detail)


@app.command(help="a job's driver logs")
def logs(
    ctx: typer.Context,
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
    attempt: Annotated[int | None, typer.Option(help="attempt number (default: the latest)")] = None,
    tail: Annotated[int | None, typer.Option(
        min=1, help="bytes of the log's end to show (default: the server's, 256 KiB); with -f, of what is already written")] = None,
    before: Annotated[int | None, typer.Option(
        min=0, help="page back: the bytes before this offset (the START an earlier page names)")] = None,
) -> None:
    if follow:
        _follow(connect(ctx), job_id, json_out=False, tail=tail)
        return
    data = connect(ctx).logs(job_id, attempt, tail, before)
    sys.stdout.write(data["logs"])
    if data["truncated"]:
        print(f"(bytes {data['start']}-{data['end']} of {data['size']}; earlier: orch logs {job_id} "
              f"--attempt {data['attempt']} --before {data['start']})", file=sys.stderr)


@app.command(help="cancel a job")
def cancel(ctx: typer.Context, job_id: JobId, json_out: JsonFlag = False) -> None:
    render.show(connect(ctx).cancel_job(job_id), json_out, lambda j: f"cancel requested for {j['id']} (now {j['state']})")


@app.command(help="resize a training job: it checkpoints, stops and restarts on the new size from that checkpoint")
def scale(
    ctx: typer.Context,
    job_id: JobId,
    num_workers: Annotated[int | None, typer.Argument(metavar="N", help="the new number of workers")] = None,
    pool: Annotated[list[str] | None, typer.Option(
        "--pool", metavar="POOL=N", help="a job spanning pools: the new count for each of its pools (repeatable)")] = None,
    json_out: JsonFlag = False,
) -> None:
    if (num_workers is None) == (not pool):
        raise CliError("give N, or --pool POOL=N for each pool of a job that spans pools", EXIT_USAGE)
    body: dict[str, Any] = {"num_workers": num_workers}
    if pool:
        counts = [p.partition("=") for p in pool]
        if any(not name or not sep or not n.isdigit() for name, sep, n in counts):
            raise CliError(f"--pool expects POOL=N, got {' '.join(pool)}", EXIT_USAGE)
        body = {"pools": {name: int(n) for name, _, n in counts}}
    render.show(connect(ctx).resize_job(job_id, body), json_out,
                lambda j: f"resize requested for {j['id']} (now {j['state']}: {j['message']})")
