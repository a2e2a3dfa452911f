"""A sweep's trial, inside its Tune actor (jobs/sweep.py drives the trials).

Each trial is a Tune function (``run_trial``). A trial of one worker (``SweepSpec.trials_in_actor``)
runs the training loop in that actor (``_run_in_actor``, workers/session.py's LocalSession), with
its checkpoints where its Train run would keep them and its reports straight to Tune. No Ray Train
run starts for it (a controller, a worker group, a placement group, a process group over actors),
which was most of a short trial's start-up.

A trial of more workers builds its TorchTrainer (jobs/runtime/trainer.py) under a run name of its
own and runs it, so it is a full Ray Train run with its own workers, checkpoints and failure
handling. Rank 0's reports reach Tune through Ray's TuneReportCallback (``_TrialReport`` makes every
report carry ``step`` and ``loss``). For PBT such a trial runs in segments of perturbation_interval
steps (``_run_segments``).

A trial asked to stop tells its own training loop (``_relay_stop``), which checkpoints at the end of
its current step and ends. (A trial that Tune stops, ASHA's cut, goes with its actor, and with it
the loop or the Train run the actor owns.)
"""

from __future__ import annotations

import functools
import math
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from jobs.contracts.sweep_events import stop_requested, trial_metrics
from jobs.runtime.trainer import build_trainer, check_storage, loop_config
from jobs.specs.sweep import PbtScheduler, SweepSpec
from jobs.specs.train import TrainSpec
from workers.checkpoint import read_meta
from workers.control import ControlChannel
from workers.device import backend_for
from workers.loop import run_loop, train_loop_per_worker
from workers.session import LocalSession
from workers.waiting import wait_until

TRIAL_RUN = "train"  # a (non-PBT) trial's run folder inside its own: its Train run's, or its checkpoints in its actor
# How often a trial looks for a request to stop it (jobs/contracts/sweep_events.py), to end its run at once.
STOP_POLL_S = 0.5
# A trial's runs have no deadline of their own: the stop relay waits as long as its trial runs.
NO_DEADLINE_S = math.inf


def _trial_report() -> Any:
    """Ray's TuneReportCallback, forwarding trial_metrics(rank 0's report) and the checkpoint path."""
    class _TrialReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            super().after_report(run_context, [trial_metrics(metrics[0])], checkpoint)

    return _TrialReport()


def _with_callbacks(trainer: Any, callbacks: list[Any]) -> Any:
    """Add Train callbacks to a built trainer. build_trainer owns the RunConfig; the trainer's run
    context holds the same RunConfig object, so setting its callbacks reaches fit()."""
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), *callbacks]
    return trainer


def _segment_loop(config: dict[str, Any], *, init_checkpoint: str | None, stop_at_step: int) -> None:
    """The worker loop of one PBT segment: start from ``init_checkpoint``, stop after the checkpoint
    at ``stop_at_step`` (WorkerConfig fields the loop honours)."""
    worker = {**config["worker"], "init_checkpoint": init_checkpoint, "stop_at_step": stop_at_step}
    train_loop_per_worker({**config, "worker": worker})


def _run_segments(spec: Any, data: Any, trial_out: Path, interval: int) -> None:
    """PBT: segments of ``interval`` steps, each a new Train run from the checkpoint Tune gave this
    trial (its own latest, or a donor's after an exploit), each ending in a report with its checkpoint."""
    given = tune.get_checkpoint()
    init = given.path if given is not None else None
    start = read_meta(Path(init))["step"] if init else 0
    while start < spec.train.steps:
        end = min(start + interval, spec.train.steps)
        loop = functools.partial(_segment_loop, init_checkpoint=init, stop_at_step=end)
        result = build_trainer(spec, data, trial_out, run_name=f"segment-{end:08d}-{uuid.uuid4().hex[:6]}",
                               train_loop=loop).fit()
        init = result.checkpoint.path
        start = read_meta(Path(init))["step"]  # before ``end`` when the trial was asked to stop
        tune.report(trial_metrics(result.metrics), checkpoint=tune.Checkpoint.from_directory(init))
        if start < end:
            return


def _run_in_actor(spec: TrainSpec, data: Any, trial_out: Path) -> None:
    """A one-worker trial: the loop in this actor, its checkpoints in ``trial_out/TRIAL_RUN`` as a
    Train run's would be (a restarted trial resumes from the newest), each report straight to Tune."""
    def report(metrics: dict[str, Any], checkpoint: Path) -> None:
        tune.report({**trial_metrics(metrics), "checkpoint_path": str(checkpoint)})

    check_storage(None, trial_out, TRIAL_RUN)  # as a Train run's: no link out of the team's roots
    with LocalSession(trial_out / TRIAL_RUN, spec.train.keep_checkpoints, report,
                      backend_for(spec.resources.device)) as session:
        run_loop(loop_config(spec, data, trial_out), session)


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], data: Any, out: str, s3: dict[str, str]) -> None:
    """One trial: the base train spec with this trial's values on ``data`` (workers.data.TrainingData,
    opened once by the driver), in this actor or as a Ray Train run in ``out/trials/<trial id>`` (a
    stable run name, so a restarted trial resumes its checkpoints); control requests go through
    that folder either way.

    ``s3``: the driver's S3 settings (workers.data.s3_env). The trial runs here, in its actor, whose
    environment is its node's rather than the driver's, and hands the S3 settings it finds to its
    workers and Ray Data tasks: set the driver's, as jobs.train hands its own."""
    os.environ.update(s3)
    swept = SweepSpec.model_validate(sweep)
    spec = swept.trial_spec(config["params"])
    trial_id = tune.get_context().get_trial_id()
    trial_out = Path(out) / "trials" / trial_id
    ended = threading.Event()
    threading.Thread(target=_relay_stop, args=(Path(out), trial_id, trial_out, ended), daemon=True).start()
    try:
        if swept.trials_in_actor:
            _run_in_actor(spec, data, trial_out)
        elif isinstance(swept.scheduler, PbtScheduler):
            _run_segments(spec, data, trial_out, swept.scheduler.perturbation_interval)
        else:
            _with_callbacks(build_trainer(spec, data, trial_out, run_name=TRIAL_RUN), [_trial_report()]).fit()
    finally:
        ended.set()


def _relay_stop(out: Path, trial_id: str, trial_out: Path, ended: threading.Event) -> None:
    """Pass a request to stop this trial to its training loop: a checkpoint at the end of the current
    step, then the run ends. The driver's stopper acts only on the reports Tune has taken in, which
    trail the loop (Ray Train forwards them when its controller polls), so a short trial could
    otherwise finish before its stop took effect."""
    # ended.wait as the sleep: the relay ends as soon as its trial does, not at its next look.
    wait_until(lambda: ended.is_set() or stop_requested(out, trial_id), timeout_s=NO_DEADLINE_S,
               interval_s=STOP_POLL_S, what=f"trial {trial_id} to end or be asked to stop", sleep=ended.wait)
    if not ended.is_set():
        ControlChannel(trial_out).request_checkpoint("the trial was asked to stop", stop=True)
