"""The driver's one view of a training run: a live progress bar on a terminal, plain lines elsewhere.

Rank 0 sends its progress over a Ray queue (workers/progress.py ``ProgressChannel``) that the driver
creates and reads in a thread while ``trainer.fit()`` blocks. A queue rather than Ray Train v2's
``UserCallback.after_report``: that callback runs in the Train controller actor, not in the driver,
so it would still need a queue to reach the driver, and it would need a ``ray.train.report`` per
progress line, which is a barrier over all workers whose result waits for the controller's poll
(every 2 s), slowing short steps.

When stdout is not a terminal (CI, ``ray job logs``, the control plane's metric parser) each report
is one ``[progress] step=../.. loss=..`` line (workers/progress.py); notes are printed as they are.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from ray.util.queue import Empty, Queue
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
)
from rich.text import Text

from jobs.contracts.training import ProgressRecord
from workers.progress import NOTE, PROGRESS

# How long the reader thread waits on the queue before checking whether training has ended.
POLL_S = 0.5
# How long the driver waits for the reader to drain the queue after fit() returns.
DRAIN_TIMEOUT_S = 10.0
REFRESH_PER_S = 4  # redraws of the live bar per second (spinner, ETA count-down)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class _EtaColumn(ProgressColumn):
    """Time left at the rate since the first report (start-up and a resumed run's skipped steps excluded)."""

    def render(self, task: Task) -> Text:
        finish_at = task.fields.get("finish_at")
        left = "-:--:--" if finish_at is None else _clock(max(0.0, finish_at - time.monotonic()))
        return Text(f"ETA {left}", style="progress.remaining")


class RunDisplay:
    """Shows the events of one run: ``(PROGRESS, ProgressRecord)`` and ``(NOTE, text)``.

    ``live``: a rich progress bar (step/total, loss, tokens/s, gradient bytes saved, ETA) with notes
    printed above it; otherwise one plain line per event on ``console``'s file.
    """

    def __init__(self, total_steps: int, live: bool, console: Console | None = None):
        self.live = live
        self.console = console or Console()
        self._first: tuple[float, int] | None = None  # (monotonic time, step) of the first report
        self._bar = Progress(
            SpinnerColumn(), BarColumn(bar_width=None), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"), TextColumn("{task.fields[ratio]}x fewer bytes"), _EtaColumn(),
            console=self.console, refresh_per_second=REFRESH_PER_S, expand=True,  # the bar takes the spare width
        )
        self._task = self._bar.add_task("train", total=total_steps, loss="-", speed="-", ratio="-", finish_at=None)

    def __enter__(self) -> RunDisplay:
        if self.live:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._bar.stop()

    def handle(self, event: tuple[str, Any]) -> None:
        kind, payload = event
        if kind == NOTE:
            self._print(str(payload))
        elif kind == PROGRESS:
            self._progress(payload)

    def _print(self, line: str) -> None:
        if self.live:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.console.file, flush=True)

    def _progress(self, m: ProgressRecord) -> None:
        if not self.live:
            self._print(m.to_line())
            return
        step, total_steps = m.step, m.total_steps
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        t0, step0 = self._first
        finish_at = now + (total_steps - step) * (now - t0) / (step - step0) if step > step0 else None
        self._bar.update(self._task, completed=step, total=total_steps, finish_at=finish_at,
                         loss=f"{m.loss:.3f}", speed=f"{m.tokens_per_s:,.0f}", ratio=f"{m.compression:.1f}")


@contextlib.contextmanager
def follow(display: RunDisplay) -> Iterator[Any]:
    """A Ray queue for the workers' events, shown on ``display`` by a thread until the block ends.

    Every put returns after the queue actor holds the event, so when ``fit()`` has returned every
    event is queued: the reader drains the queue before it stops.
    """
    queue = Queue(actor_options={"num_cpus": 0})  # no CPU taken from the workers' scheduling
    done = threading.Event()

    def read() -> None:
        while True:
            try:
                event = queue.get(timeout=POLL_S)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception:  # the cluster went away; fit() reports why
                return
            display.handle(event)

    reader = threading.Thread(target=read, name="progress-display", daemon=True)
    with display:
        reader.start()
        try:
            yield queue
        finally:
            done.set()
            reader.join(DRAIN_TIMEOUT_S)
    with contextlib.suppress(Exception):
        queue.shutdown(force=True)  # drained
