"""The serve kind: a checkpoint behind OpenAI-compatible routes on Ray Serve (jobs/serve.py); through
the service, a deployment only (orchestrator/deployments/reconciler.py)."""

from __future__ import annotations

from jobs.kinds.base import Bundle, JobKind
from jobs.specs.serve import ServeSpec

KIND = JobKind(
    "serve", "jobs.serve", ServeSpec, "a checkpoint behind OpenAI-compatible routes on Ray Serve",
    path_fields=("checkpoint",),
    # Its replicas at their maximum, on CPUs: Serve's autoscaler adds replicas up to it without asking.
    demand=lambda spec: (Bundle("cpu", {"CPU": spec.num_cpus}, spec.autoscaling.max_replicas),),
    resumes="a serve job has no state",
    serves=True,
)
