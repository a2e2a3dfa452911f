"""Data roots: the folders and ``s3://`` prefixes a non-admin's job may read and write.

Each job kind names the spec fields that hold a path it reads or writes (``path_fields`` of its
jobs/kinds/ file). A set field must lie under one of the team's roots:

* local paths are absolute, and compared after ``os.path.realpath`` of both sides (symlinks and
  ``..`` resolved, as far as they exist on the API's machine), component by component: ``/data/nlp2``
  is not under ``/data/nlp``;
* ``s3://bucket/key`` is compared by bucket, then key components, after ``.``, ``..`` and empty
  components are normalised away; a key that climbs above its bucket is refused;
* any other scheme (``gs://``, ``file://``, ``http://``) is refused.

A field left unset (None) is the kind's default: for train, the standard library's source (read
only) and a cache folder the service chooses. Output folders of train jobs are chosen by the
service (``<jobs_dir>/<job id>/out``), never by a spec, and hold the checkpoints unless the spec's
``checkpoint_storage`` puts them elsewhere (checked like the others); serve's checkpoint is a spec
field, checked likewise. An unknown kind is refused for non-admins (fail closed). The check runs at
submission, on the API's view of the file system, which must be the cluster's (shared storage, see
README); a symlink made inside a root *after* submission is outside what it can see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jobs.kinds import KINDS

S3_SCHEME = "s3://"


def _values(spec: Mapping[str, Any], field: str) -> Iterator[tuple[str, Any]]:
    """``(field path, value)`` of each set value at ``field``; list items get their index appended."""
    node: Any = spec
    for part in field.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return
        node = node[part]
    if isinstance(node, list | tuple):
        for i, item in enumerate(node):
            if item is not None:
                yield f"{field}.{i}", item
    else:
        yield field, node


def _is_s3(value: str) -> bool:
    return value[:len(S3_SCHEME)].lower() == S3_SCHEME


def _s3_parts(uri: str) -> tuple[str, ...] | None:
    """``(bucket, *key components)`` with ``.``/``..``/empty components resolved; None if the key
    climbs above the bucket or there is no bucket."""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    parts: list[str] = []
    for c in key.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(c)
    return (bucket, *parts) if bucket and bucket not in (".", "..") else None


def _local_parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in os.path.realpath(path).split(os.sep) if p)


def _under(candidate: tuple[str, ...], root: tuple[str, ...]) -> bool:
    return candidate[:len(root)] == root


# What a root must look like, for the API's schema (root_error says why one is refused).
ROOT_PATTERN = r"^(/|[sS]3://[A-Za-z0-9])[^\x00]*$"


def root_error(value: Any) -> str | None:
    """Why ``value`` cannot be a data root (or a path compared with one), or None if it can."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if "\x00" in value:
        return "must not contain a NUL character"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "must be valid Unicode (it holds a lone surrogate)"
    if _is_s3(value):
        return None if _s3_parts(value) is not None else "is not an s3://bucket/key inside its bucket"
    if "://" in value:
        return "only local paths and s3:// are allowed"
    if not os.path.isabs(value):
        return "must be an absolute path"
    return None


def _outside(value: str, roots: Sequence[str]) -> bool:
    if _is_s3(value):
        candidate = _s3_parts(value)
        s3_roots = [parts for root in roots if _is_s3(root) and (parts := _s3_parts(root)) is not None]
        return candidate is None or not any(_under(candidate, r) for r in s3_roots)
    local = _local_parts(value)
    return not any(_under(local, _local_parts(root)) for root in roots if "://" not in root and os.path.isabs(root))


def root_violations(kind: str, spec: Mapping[str, Any], roots: Sequence[str]) -> list[tuple[str, str]]:
    """``(field path, message)`` for each path field of ``spec`` outside ``roots``; empty: allowed.
    An unknown kind is refused as a whole (fail closed)."""
    if kind not in KINDS:
        return [("kind", f"{kind!r} is no job kind with a data-root check; only an admin may submit it")]
    where = ", ".join(roots) if roots else "none set; ask an admin (orch team set)"
    problems = []
    for field in KINDS[kind].path_fields:
        for path, value in _values(spec, field):
            error = root_error(value)
            if error is None and _outside(value, roots):
                error = f"{value!r} is outside your team's data roots ({where})"
            if error is not None:
                problems.append((path, error))
    return problems


def check_data_roots(kind: str, spec: Mapping[str, Any], roots: Sequence[str]) -> list[str]:
    """``root_violations`` as ``"field.path: message"`` lines (the form CLI and API errors use)."""
    return [f"{field}: {message}" for field, message in root_violations(kind, spec, roots)]
