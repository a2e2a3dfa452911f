"""The registry of job kinds: kind -> entry module and spec model, one definition for the API's
schemas, the controller's entry-point allow-list and its re-validation of stored specs.

Every kind runs the same way, under the service or by hand with ``ray job submit``:
``python -m <module> --spec FILE --out DIR``, the spec validated by the kind's model before any Ray
work starts. A new kind (sweep, serve, prepare) is one entry here and one module under ``jobs/``.
Torch-free: the control plane imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel

from jobs.prepare_spec import PrepareSpec
from jobs.serve_spec import ServeSpec
from jobs.specs import TrainSpec
from jobs.sweep_spec import SweepSpec


@dataclass(frozen=True)
class JobKind:
    name: str
    module: str  # run as `python -m MODULE --spec FILE --out DIR`
    spec: type[BaseModel]
    summary: str  # one line, for docs and `--help`
    # A kind that serves holds a Serve application (a name, a route prefix) after its driver exits:
    # through the service it runs only as a deployment (POST /v1/deployments: one namespace, its
    # uniqueness and nesting rules, its reconciler, its quota); never as a plain job.
    serves: bool = False


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("train", "jobs.train", TrainSpec, "distributed MoE training on Ray Train"),
    JobKind("serve", "jobs.serve", ServeSpec, "a checkpoint behind OpenAI-compatible routes on Ray Serve",
            serves=True),
    JobKind("prepare", "jobs.prepare", PrepareSpec, "corpus -> tokenizer -> packed parquet shards + manifest"),
    JobKind("sweep", "jobs.sweep", SweepSpec, "a hyperparameter sweep of training runs on Ray Tune"),
)}

# The kinds as a type, for request schemas: Literal["train", ...] and the union of their specs.
KindName = Literal[tuple(KINDS)]  # type: ignore[valid-type]
AnySpec = Union[tuple(k.spec for k in KINDS.values())]  # type: ignore[valid-type]  # noqa: UP007


def job_kind(name: str) -> JobKind:
    """The registered kind, or ValueError naming the kinds there are."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r} (kinds: {', '.join(sorted(KINDS))})") from None
