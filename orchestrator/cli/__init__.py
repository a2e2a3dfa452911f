"""`orch`: start the service, submit and watch jobs. Readable tables by default, ``--json`` for scripts.

    orch up [--port 8080] [--local] [--num-cpus N]   local Ray head (unless RAY_ADDRESS) + the API on
                                                     127.0.0.1; SIGINT, SIGTERM or SIGHUP stop both
    orch submit SPEC [--set k=v] [--follow]          validate locally, POST /v1/jobs
    orch list | status ID | logs ID [-f] | cancel ID | cluster
    orch sweep SPEC [--set k=v] [--follow]           validate locally, POST /v1/sweeps
    orch trials ID [-f] | stop-trial ID TRIAL        a sweep's trials; stop one (orch cancel ID: all)
    orch serve (CHECKPOINT | --job ID) [--name N] [--set k=v] [--wait [--timeout S]]   POST /v1/deployments;
                                                     prints the OpenAI base URL and the key (shown once);
                                                     --wait: until it runs, at most S seconds (600)
    orch deployments [show ID | delete ID]           serving deployments
    orch token create --user U --team T [--role user|admin] | token list | token revoke ID   (admin)
    orch team set TEAM [--root PATH ...] [--quota POOL=N ...] | team show [TEAM]           (admin)
    orch audit [--team T]

The client reads ORCH_URL (default http://127.0.0.1:8080) and ORCH_API_TOKEN, or in local mode the
token file ``<ORCH_STATE_DIR>/api_token`` that `orch up --local` wrote.
Exit codes: 0 ok, 1 the job failed or the API said no, 2 bad arguments or an invalid spec,
130 `--follow` interrupted (the job goes on).

A command is one function under ``@app.command`` (orchestrator/cli/core.py says how); its module is
imported below so that it registers.
"""

from __future__ import annotations

import sys

from orchestrator.cli import cluster, jobs, serve, sweeps, tokens, up  # noqa: F401 - each module registers its commands on `app`
from orchestrator.cli.core import CliError, app

__all__ = ["CliError", "app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs `orch` with ``argv`` (default: the process's arguments) and returns its exit code; the
    ``orch`` script exits with it. Usage errors print Typer's message and return 2."""
    try:
        app(args=argv, prog_name="orch")
    except SystemExit as e:  # Typer's standalone mode ends every run, ok or not, with sys.exit
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    return 0
