"""What a job kind is: the one record of its rules, read by the API, the scheduler, the controller and
the data-root check alike (torch-free: the control plane imports it).

A kind says how it runs (``module``, validated by ``spec``), which spec fields name paths (checked
against the team's data roots), what it holds on the cluster (``demand``, as placement bundles),
whether it can be resized, how it is stopped (asked to checkpoint first, or stopped at once because
it resumes on its own) and whether it serves. Each kind is one file beside this one; the registry
(``jobs/kinds/__init__.py``) lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Bundle:
    """``count`` placement bundles of ``need`` (Ray resource -> amount) in ``pool`` (an exact pool such
    as ``gpu-a100`` or a bare device such as ``gpu``, jobs/contracts/pools.py)."""
    pool: str
    need: Mapping[str, float]
    count: int = 1


@dataclass(frozen=True)
class JobKind:
    name: str
    module: str  # run as `python -m MODULE --spec FILE --out DIR`
    spec: type[BaseModel]
    summary: str  # one line, for docs and `--help`
    # Dotted spec fields that name a path the job reads or writes (a string or a list of strings);
    # each set one must lie under the submitting team's data roots (orchestrator/auth/roots.py).
    # Required: a kind that forgot its paths would let a team read anywhere.
    path_fields: tuple[str, ...]
    # What a job of this kind holds while it runs, at its largest, as placement bundles; the first
    # bundle's pool also holds the driver's reservation (jobs/contracts/demand.py: totals; the autoscaler sees
    # the bundles themselves, orchestrator/controller/demand_groups.py).
    demand: Callable[[Any], tuple[Bundle, ...]]
    # Whether PATCH /v1/jobs/{id} may change its worker count (jobs/contracts/elastic.py reads a train spec).
    resizable: bool = False
    # How it is stopped (cancel, preemption, resize): a kind whose loop answers "checkpoint now"
    # (workers/control.py) is asked first and stopped once it confirms; any other is stopped at once,
    # and ``resumes`` says why that loses nothing (it is the note in the job's next reason).
    checkpoint_on_stop: bool = False
    resumes: str = ""
    # A kind that serves holds a Serve application (a name, a route prefix) after its driver exits:
    # through the service it runs only as a deployment (POST /v1/deployments: one namespace, its
    # uniqueness and nesting rules, its reconciler, its quota); never as a plain job.
    serves: bool = False
    # Its output folder holds model checkpoints a deployment may serve by job id (a sweep's trials:
    # promote the best to a train job first).
    servable_output: bool = False

    def __post_init__(self) -> None:
        if not self.checkpoint_on_stop and not self.resumes:
            raise ValueError(f"job kind {self.name!r}: say how it resumes when stopped without a checkpoint")
