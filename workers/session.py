"""What the training loop asks of whoever runs it: its rank, a checkpoint to resume from, and where
its reports and checkpoints go.

``RayTrainSession``: inside a Ray Train worker (``train_loop_per_worker``), which has set up the
process group; reports and checkpoints go to Ray Train (and from there to Tune through its report
callback, for a sweep trial run as a Train run).

``LocalSession``: one process that is its whole world, e.g. a one-worker sweep trial inside its Tune
actor (jobs/runtime/sweep_trial.py): no Train controller, worker group or placement group to start,
which is most of a short trial's start-up. It sets up a one-rank process group itself, keeps its
checkpoints in a run folder laid out as Ray Train's (so whatever finds a run's newest checkpoint
finds its), and hands each report to the caller (Tune's report, for a trial). Not Tune's own
checkpoints: Tune registers a trial's checkpoint in its experiment state, saved every 10 s or more,
so a driver killed in between would restart the trial from an older one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist


class Session(Protocol):
    rank: int
    world: int
    local_world: int  # workers of this job on this node (their threads share its cores)

    def resume_point(self, init_checkpoint: str | None) -> Any:
        """The checkpoint to resume from (``as_directory()``, ``filesystem``): the run's latest,
        else ``init_checkpoint`` (a folder), else None."""

    def staging(self) -> AbstractContextManager[Path]:
        """A folder for this rank's checkpoint files until ``report`` has taken them; gone after."""

    def report(self, metrics: dict[str, Any], folder: Path | None, name: str) -> None:
        """Report ``metrics`` and, on rank 0, the checkpoint ``folder`` (taken before this returns)."""

    def wait_committed(self) -> None:
        """Rank 0: until the reported checkpoint is registered where a restart finds it."""


class RayTrainSession:
    """Inside a Ray Train worker (module docstring)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world, self.local_world = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_world_size()

    def resume_point(self, init_checkpoint: str | None) -> Any:
        import ray.train

        return ray.train.get_checkpoint() or (ray.train.Checkpoint(init_checkpoint) if init_checkpoint else None)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory() as tmp:  # ray.train.report copies it to the run's storage
            yield Path(tmp)

    def report(self, metrics: dict[str, Any], folder: Path | None, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                         checkpoint_dir_name=name)

    def wait_committed(self) -> None:
        import ray.train

        # Ray Train registers a report only when its controller next polls the workers (every 2 s):
        # a node lost before then would take the checkpoint with it, and a resume would go back
        # a whole interval.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class LocalSession:
    """One process, rank 0 of 1 (module docstring), as a context that holds its process group. Its
    checkpoints are ``step-N`` folders in ``run_dir``, as a Ray Train run keeps them (the newest
    ``keep``); it resumes from the newest there, else from ``init_checkpoint``. Each report goes to
    ``on_report(metrics, the checkpoint's folder)`` once the folder is in place."""

    rank, world, local_world = 0, 1, 1

    def __init__(self, run_dir: Path, keep: int, on_report: Callable[[dict[str, Any], Path], None],
                 backend: str = "gloo"):
        self.run_dir, self.keep, self.on_report, self.backend = run_dir, keep, on_report, backend

    def __enter__(self) -> LocalSession:
        for stale in self.run_dir.glob(".partial-*"):  # staged by a process that died before its report
            shutil.rmtree(stale, ignore_errors=True)
        # A one-rank group in this process: the loop's collectives (DDP, byte totals) run as they do
        # on N ranks. ``backend``: workers/device.py's for the device, as Ray Train would set up.
        dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)
        return self

    def __exit__(self, *exc: object) -> None:
        dist.destroy_process_group()  # a reused actor starts its next run with a fresh group

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints in ``run_dir``, oldest first."""
        found = [p for p in self.run_dir.glob("step-*") if (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))

    def resume_point(self, init_checkpoint: str | None) -> Any:
        import ray.train

        saved = self.checkpoints()
        path = str(saved[-1]) if saved else init_checkpoint
        return ray.train.Checkpoint(path) if path else None

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden folder in ``run_dir`` that ``report`` renames into place: a checkpoint is written
        once, and a crash leaves no half checkpoint under ``step-*``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.run_dir))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # already renamed, unless the save failed

    def report(self, metrics: dict[str, Any], folder: Path | None, name: str) -> None:
        if folder is None or folder.parent != self.run_dir:  # the loop saves every checkpoint in staging()
            raise ValueError(f"a one-process run reports a checkpoint from its staging() with every report, not {folder}")
        dest = self.run_dir / name
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(folder, dest)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.on_report(metrics, dest)

    def wait_committed(self) -> None:
        """The folder was in place before report returned."""
