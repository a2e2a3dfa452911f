"""The registry of job kinds: one file per kind beside this one (its rules: jobs/kinds/base.py), one
line each in ``KINDS``. The API's schemas, the controller's entry-point allow-list and its
re-validation of stored specs, the scheduler's demand, the data-root check and the stop all read
their kind from here.

Every kind runs the same way, under the service or by hand with ``ray job submit``:
``python -m <module> --spec FILE --out DIR``, the spec validated by the kind's model before any Ray
work starts. A new kind is one file here, one line below, its spec under ``jobs/specs/`` and its
entry module under ``jobs/``. Torch-free: the control plane imports it.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel

from jobs.kinds import prepare, serve, sweep, train
from jobs.kinds.base import Bundle, JobKind

KINDS: dict[str, JobKind] = {k.name: k for k in (
    train.KIND,
    serve.KIND,
    prepare.KIND,
    sweep.KIND,
)}

# The kinds as a type, for request schemas: Literal["train", ...] and the union of their specs.
KindName = Literal[tuple(KINDS)]  # type: ignore[valid-type]
AnySpec = Union[tuple(k.spec for k in KINDS.values())]  # type: ignore[valid-type]  # noqa: UP007

__all__ = ["KINDS", "AnySpec", "Bundle", "JobKind", "KindName", "job_kind", "kind_of"]


def job_kind(name: str) -> JobKind:
    """The registered kind, or ValueError naming the kinds there are."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r} (kinds: {', '.join(sorted(KINDS))})") from None


def kind_of(spec: BaseModel) -> JobKind:
    """The kind whose spec model ``spec`` is (or extends: a deployment's options extend serve's)."""
    for kind in KINDS.values():
        if isinstance(spec, kind.spec):
            return kind
    raise TypeError(f"no job kind has the spec model {type(spec).__name__}")
