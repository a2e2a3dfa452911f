"""The Typer app every `orch` command hangs on, the global ``--url`` option and the CLI's error type.

A command is one function in a module of this package, decorated with ``@app.command(...)``; the
package's ``__init__`` imports that module so the decorator runs. It talks to the API through
``connect(ctx)`` (orchestrator/cli/client.py: one typed method per request), prints its answer with
``render.show`` (``--json`` or a table/text), raises CliError for a failure the user can act on and
``typer.Exit(code)`` for any other non-zero exit.
"""

from __future__ import annotations

from typing import Annotated

import typer

DEFAULT_URL = "http://127.0.0.1:8080"

# Exit codes (the module docstring of orchestrator.cli lists them for users).
EXIT_FAILED = 1  # the job failed, or the API said no
EXIT_USAGE = 2  # bad arguments or an invalid spec (click's own code for usage errors too)


class CliError(Exception):
    """A failure reported as ``error: <message>`` on stderr and exit ``code``, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


app = typer.Typer(
    name="orch",
    help="MoE training control plane: start the service, submit and watch jobs on cpu | gpu | npu pools. "
         "Readable tables by default, --json for scripts.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # A traceback's locals would print the API token (client headers, settings).
    pretty_exceptions_show_locals=False,
)

# `--json` on every command whose answer is an API object: the API's JSON as it came, indented by 2.
JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@app.callback()
def _global_options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="ORCH_URL", help="API base URL")] = DEFAULT_URL,
) -> None:
    ctx.obj = url


def api_url(ctx: typer.Context) -> str:
    """The ``--url`` given before the command (subcommand contexts inherit the group's ``obj``)."""
    return ctx.obj
