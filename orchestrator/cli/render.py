"""Human-readable output: rich tables on stdout, and the ``--json`` form; ``show`` picks one.

On a terminal the tables have a rule under the header and coloured job states. Anywhere else (a pipe,
a file, a test's captured stdout) rich writes no colour, and the tables are plain columns: a header
line, then one line per row, never wrapped or cut, without trailing spaces, so ``grep`` and ``awk``
work on them. Cells are rich ``Text``: a job's message or metric is never read as markup or emoji.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

# Off a terminal a table line is as long as its content: rich would wrap at 80 columns otherwise.
PLAIN_WIDTH_CHARS = 100_000
STATE_STYLES = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan",
                "RETRYING": "magenta", "STARTING": "blue", "RESIZING": "blue", "PREEMPTING": "magenta"}


def print_json(data: Any) -> None:
    """The API's JSON as it came, indented by 2 (the form scripts parse; never through rich)."""
    print(json.dumps(data, indent=2))


def show(data: Any, json_out: bool, human: Callable[[Any], str | RenderableType | list[RenderableType]],
         file: TextIO | None = None) -> None:
    """A command's answer: with ``--json`` the API's JSON as it came (on stdout); otherwise what
    ``human(data)`` makes of it: a line of text printed as it is (on ``file``, default stdout: a
    command whose stdout carries logs tells people on stderr), or tables and text through ``emit``."""
    if json_out:
        print_json(data)
        return
    out = human(data)
    if isinstance(out, str):
        print(out, file=file or sys.stdout)
    else:
        emit(*(out if isinstance(out, list) else [out]))


def _console() -> Console:
    # Made per call: sys.stdout is looked up now (tests capture it by replacing it).
    console = Console(file=sys.stdout, highlight=False, markup=False, emoji=False)
    if not console.is_terminal:
        console.width = PLAIN_WIDTH_CHARS
    return console


def emit(*renderables: RenderableType) -> None:
    """Print each renderable on stdout (see the module docstring for the two forms)."""
    console = _console()
    if console.is_terminal:
        for r in renderables:
            console.print(r)
        return
    with console.capture() as captured:
        for r in renderables:
            console.print(r)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def cell(value: Any) -> Text:
    if isinstance(value, Text):
        return value
    return Text("-" if value is None else str(value))


def state(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(box=box.SIMPLE_HEAD if _console().is_terminal else None, show_edge=False, pad_edge=False,
              header_style="bold")
    for h in headers:
        t.add_column(h, overflow="fold")
    for row in rows:
        t.add_row(*(cell(v) for v in row))
    return t


def page(rows: Table, shown: int, count: int) -> list[RenderableType]:
    """One page of a list: its table, and a note when the API holds more than the page shows."""
    return [rows, *([f"({shown} of {count}; --limit to see more)"] if count > shown else [])]


def section(title: str) -> Text:
    return Text(f"\n{title}", style="bold")


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def job_detail(job: dict[str, Any]) -> list[RenderableType]:
    """`orch status`: the job's fields, then its history, attempts and latest metrics when it has them."""
    out: list[RenderableType] = [table(["FIELD", "VALUE"], [
        ["id", job["id"]], ["name", job["name"]], ["state", state(job["state"])], ["message", job["message"]],
        ["attempts", f"{job['attempts']} (max retries {job['max_retries']})"],
        ["ray submission", job["ray_submission_id"]],
        ["cancel requested", "yes" if job["cancel_requested"] else "no"], ["created", age(job["created_at"]) + " ago"],
    ])]
    if job.get("history"):
        out += [section("history"), table(["AT", "FROM", "TO", "REASON"], [
            [time.strftime("%H:%M:%S", time.localtime(e["at"])), e["from_state"], e["to_state"], e["reason"]]
            for e in job["history"]])]
    if job.get("attempt_history"):
        out += [section("attempts"), table(["N", "RAY SUBMISSION ID", "RAY STATUS", "EXIT"], [
            [a["number"], a["ray_submission_id"], a["ray_status"], a["exit_code"]] for a in job["attempt_history"]])]
    if job.get("metrics"):
        out += [section("metrics"), table(["METRIC", "VALUE"], [[k, fmt(v)] for k, v in job["metrics"].items()])]
    return out


def queue(job: dict[str, Any]) -> str:
    """`orch list`'s QUEUE cell: ``#3: waiting for 2 GPU in pool gpu-a100; 2 jobs ahead`` while QUEUED."""
    if job.get("state") != "QUEUED" or job.get("queue_position") is None:
        return "-"
    return f"#{job['queue_position']}: {job.get('queue_reason') or 'waiting'}"
