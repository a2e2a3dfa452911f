"""The sweep kind: a hyperparameter sweep of training runs on Ray Tune (jobs/sweep.py)."""

from __future__ import annotations

from jobs.kinds.base import JobKind
from jobs.kinds.train import train_bundles
from jobs.specs.sweep import SweepSpec

KIND = JobKind(
    "sweep", "jobs.sweep", SweepSpec, "a hyperparameter sweep of training runs on Ray Tune",
    # The base train spec's paths, as a train job's (a sweep may not vary data paths: jobs/specs/sweep.py).
    path_fields=("base.data.source", "base.data.path"),
    demand=lambda spec: train_bundles(spec.trial_spec({}), spec.max_concurrent),  # its trials at most at once
    resumes="its trials checkpoint through Tune and resume with Tuner.restore",
)
