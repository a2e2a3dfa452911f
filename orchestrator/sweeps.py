"""The control plane's view of a sweep: a job of kind "sweep" plus the trial events its driver writes
in the job's output folder (jobs/contracts/sweep_events.py), and stop requests for one trial.

The driver is the only writer of the events; the service only reads them, so a sweep's trials are
visible while it runs without any call into Ray, and after the service restarts. Once the job has
ended, a trial the events still show as unfinished went down with its driver: it is reported STOPPED
(the sweep was cancelled) or FAILED (the sweep failed). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.contracts.sweep_events import SweepView, TrialState, read_sweep, request_stop
from jobs.kinds import sweep
from jobs.specs.sweep import SweepSpec
from jobs.specs.train import LoopConfig
from orchestrator.controller.entrypoints import job_paths
from orchestrator.states import JobState
from orchestrator.store import JobRecord

SWEEP_KIND = sweep.KIND.name


class TrialNotFound(LookupError):
    """The sweep has no trial of that id (yet)."""


class TrialFinished(RuntimeError):
    """The trial, or its whole sweep, has already ended."""


def sweep_out(job_root: Path, job: JobRecord) -> Path:
    return job_paths(job_root, job.id).out


def _spec_fields(spec: dict[str, Any]) -> tuple[str, str, int]:
    """metric, mode and steps per trial of a stored sweep spec (stored specs were validated; the
    defaults are SweepSpec's and TrainSpec's, read without revalidating on every request)."""
    steps = ((spec.get("base") or {}).get("train") or {}).get("steps") or LoopConfig().steps
    return spec.get("metric") or "loss", spec.get("mode") or "min", int(steps)


def trials_total(spec: dict[str, Any]) -> int:
    try:
        return SweepSpec.model_validate(spec).n_trials
    except ValueError:  # a spec stored by an older version; the trials seen so far still show
        return 0


def sweep_view(job_root: Path, job: JobRecord) -> SweepView:
    """The sweep's trials as its events tell them, settled against the job's state."""
    metric, mode, steps = _spec_fields(job.spec)
    view = read_sweep(sweep_out(job_root, job), metric=metric, mode=mode, total_steps=steps)
    if job.state.terminal:
        settled = TrialState.FAILED if job.state is JobState.FAILED else TrialState.STOPPED
        for trial in view.trials:
            if not trial.state.terminal:
                trial.state = settled
        view.counts = {}
        for trial in view.trials:
            view.counts[trial.state] = view.counts.get(trial.state, 0) + 1
    return view


def stop_trial(job_root: Path, job: JobRecord, trial_id: str, who: str) -> float:
    """Ask the sweep's driver to stop one trial at its next report; returns when it was asked."""
    if job.state.terminal:
        raise TrialFinished(f"sweep {job.id} already {job.state.value}")
    trial = next((t for t in sweep_view(job_root, job).trials if t.id == trial_id), None)
    if trial is None:
        raise TrialNotFound(f"sweep {job.id} has no trial {trial_id}")
    if trial.state.terminal:
        raise TrialFinished(f"trial {trial_id} already {trial.state.value}")
    return request_stop(sweep_out(job_root, job), trial_id, f"stopped by {who}")
