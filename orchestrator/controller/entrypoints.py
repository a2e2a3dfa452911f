"""The allow-list of job entry points and the one function that builds a Ray entrypoint string.

Ray runs an entrypoint with a shell, so the string is built only from an allow-listed module name
and shlex-quoted paths the controller chose; no client text reaches it. The command is exactly what
``ray job submit -- python -m jobs.train --spec FILE --out DIR`` runs.

Files: the controller writes the validated spec to ``<jobs_dir>/<id>/spec.json`` and passes
``<jobs_dir>/<id>/out`` as ``--out`` (summary.json and checkpoints; a retry reuses it and resumes).
A local cluster shares this filesystem; a remote cluster needs ``ORCH_JOBS_DIR`` on a shared mount.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.kinds import KINDS

# Job kind -> module run with `python -m`, from the registry of job kinds (jobs/kinds/).
ALLOWED_ENTRYPOINTS: dict[str, str] = {name: kind.module for name, kind in KINDS.items()}

# Where a team's job may open files (read by workers/confine.py in every process of the job).
DATA_ROOTS_ENV = "ORCH_DATA_ROOTS"
ADMIN_TEAM = "admin"  # the bootstrap admin's own jobs (orchestrator.auth.ADMIN): unconfined

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    def write_spec(self, spec: dict[str, Any]) -> None:
        """Write spec.json atomically (a crash leaves the old file or the new one, never half of one)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.spec.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(spec, indent=2, sort_keys=True))
        os.replace(tmp, self.spec)


def job_paths(jobs_dir: Path, job_id: str) -> JobPaths:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return JobPaths(jobs_dir / job_id)


def build_entrypoint(kind: str, paths: JobPaths, python: str = "python",
                     entrypoints: dict[str, str] = ALLOWED_ENTRYPOINTS) -> str:
    module = entrypoints.get(kind)
    if module is None:
        raise ValueError(f"job kind {kind!r} has no allowed entry point (allowed: {sorted(entrypoints)})")
    if not _MODULE.fullmatch(module):
        raise ValueError(f"not a module name: {module!r}")
    argv = [python, "-m", module, "--spec", str(paths.spec), "--out", str(paths.out)]
    return shlex.join(argv)


def confinement_env(team: str, roots: tuple[str, ...], *own: str | Path) -> dict[str, str]:
    """The env var that confines a team's job or deploy (``ORCH_DATA_ROOTS``): the team's local roots
    as they are when it starts (an ``s3://`` root has no links to follow), plus the local folders the
    service chose for it (``own``: a job's folder, a deployment's pinned checkpoint). Every file it
    opens must then lie under them, links resolved (workers/confine.py). The admin team's jobs run
    unconfined, as do jobs submitted with ``ray job submit``."""
    if team == ADMIN_TEAM:
        return {}
    local = [str(r) for r in (*roots, *own) if os.path.isabs(r)]
    return {DATA_ROOTS_ENV: json.dumps(local)}
