"""Where a team's job may open files: under its data roots, checked when each file is opened.

The API checks a spec's path fields at submission (``orchestrator/auth/roots.py``), on the top
folder each names. A symlink *inside* such a folder (``corpus/x.py -> /other/team/file``, a
``step-*`` link, a link inside ``checkpoint_storage``) is invisible to that check, so every file a
user's job reads or writes is checked again here, on the path the kernel actually opened.

The controller passes the team's roots to each attempt of a non-admin team's job in
``ORCH_DATA_ROOTS`` (a JSON list; ``s3://`` roots are ignored here: object stores have no links,
and their keys are checked at submission and in the manifest). Unset (an admin's job, a job run by
hand with ``python -m`` or ``ray job submit``): no confinement. Local roots are compared after
``os.path.realpath``, component by component (``/data/nlp2`` is not under ``/data/nlp``).

``open`` is race-free where ``/proc`` exists: it opens first, then checks the file the descriptor
names, so a link swapped in between a check and the open is caught too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOTS_ENV = "ORCH_DATA_ROOTS"


class OutsideRoots(PermissionError):
    """A file a job was about to read or write lies outside its team's data roots (the message names
    the file and where it resolves)."""


def _parts(path: str | os.PathLike) -> tuple[str, ...]:
    return tuple(p for p in os.path.realpath(os.fspath(path)).split(os.sep) if p)


@dataclass(frozen=True)
class Confinement:
    roots: tuple[str, ...]  # local absolute folders (as given; resolved when compared)

    def with_roots(self, *extra: str | os.PathLike) -> Confinement:
        """The same confinement, also allowing ``extra`` (folders the service itself chose: a job's
        output folder, the default corpus, the shard cache)."""
        return Confinement((*self.roots, *(os.fspath(e) for e in extra)))

    def allows(self, path: str | os.PathLike) -> bool:
        candidate = _parts(path)
        return any(candidate[:len(r)] == r for r in map(_parts, self.roots))

    def check(self, path: str | os.PathLike, what: str = "file") -> Path:
        """``path`` resolved, or OutsideRoots naming it and where it leads."""
        real = os.path.realpath(os.fspath(path))
        if not self.allows(real):
            raise OutsideRoots(f"{what} {os.fspath(path)} resolves to {real}, outside the team's data roots "
                               f"({', '.join(self.roots) or 'none'}); links out of a root are not followed")
        return Path(real)

    def open(self, path: str | os.PathLike, mode: str = "rb") -> IO:
        """``open(path, mode)``, refused (OutsideRoots) unless the file opened lies under the roots."""
        self.check(path)  # before opening: no create, truncate or device read outside
        f = open(path, mode)  # noqa: SIM115 (returned to the caller)
        try:
            opened = f"/proc/self/fd/{f.fileno()}"
            if os.path.exists(opened):
                self.check(os.readlink(opened))
        except BaseException:
            f.close()
            raise
        return f


def from_env(environ: dict[str, str] | None = None) -> Confinement | None:
    """The confinement the controller set for this job (``ORCH_DATA_ROOTS``), or None (unconfined)."""
    raw = (os.environ if environ is None else environ).get(ROOTS_ENV)
    if raw is None:
        return None
    roots = json.loads(raw)
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise ValueError(f"{ROOTS_ENV} must be a JSON list of paths, got {raw!r}")
    return Confinement(tuple(r for r in roots if os.path.isabs(r)))


def env_value(roots: Iterable[str]) -> str:
    """``ORCH_DATA_ROOTS``'s value for these roots (the controller's side of ``from_env``)."""
    return json.dumps(list(roots))


def check(path: str | os.PathLike, what: str = "file", *, also: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` resolved; under this job's confinement (if any, widened by ``also``) or OutsideRoots."""
    c = from_env()
    return Path(os.path.realpath(os.fspath(path))) if c is None else c.with_roots(*also).check(path, what)


def open_file(path: str | os.PathLike, mode: str = "rb", *, also: Iterable[str | os.PathLike] = ()) -> IO:
    """``open`` under this job's confinement (if any, widened by ``also``)."""
    c = from_env()
    return open(path, mode) if c is None else c.with_roots(*also).open(path, mode)  # noqa: SIM115
