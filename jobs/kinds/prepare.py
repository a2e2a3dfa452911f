"""The prepare kind: corpus -> tokenizer -> packed parquet shards + manifest (jobs/prepare.py)."""

from __future__ import annotations

from jobs.kinds.base import Bundle, JobKind
from jobs.specs.prepare import PrepareSpec

KIND = JobKind(
    "prepare", "jobs.prepare", PrepareSpec, "corpus -> tokenizer -> packed parquet shards + manifest",
    path_fields=("source", "path"),
    # One shard task at least (it takes what is free beyond that), on CPUs.
    demand=lambda spec: (Bundle("cpu", {"CPU": spec.cpus_per_task}, spec.max_tasks or 1),),
    resumes="it resumes from its done shards",
)
