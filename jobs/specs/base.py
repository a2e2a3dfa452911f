"""What every job spec shares: its ``name``, ``SpecError`` naming the bad field, reading a YAML
file and applying ``--set a.b=value`` overrides (torch-free: the control plane validates specs too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

# Job, user and team names: short, printable, safe in paths, logs and audit lines. One pattern for
# every spec's ``name`` and the control plane's user, team and deployment names (orchestrator/auth).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_MAX_CHARS = 64


def spec_name(default: str) -> Any:
    """A spec's ``name`` field (at most NAME_MAX_CHARS, so a too-long name's error says the limit)."""
    return Field(default, min_length=1, max_length=NAME_MAX_CHARS, pattern=NAME_PATTERN)


M = TypeVar("M", bound=BaseModel)


class SpecError(ValueError):
    """A spec that does not parse or validate; the message names the field."""


def field_errors(errors: Iterable[Mapping[str, Any]], *, skip: int = 0, root: str = "<spec>") -> list[str]:
    """The one human rendering of pydantic validation errors, ``field.path: message`` per error
    (specs here, settings, the CLI's view of an API 422). ``skip`` leading location parts are
    dropped (the API's "body")."""
    lines = []
    for e in errors:
        field = ".".join(str(p) for p in list(e.get("loc", ()))[skip:]) or root
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg")
        lines.append(f"{field}: {msg}")
    return lines


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``100``, ``true``, ``null``)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set expects KEY=VALUE, got {assignment!r}")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise SpecError(f"{key}: value {value!r} does not parse: {e}") from None


def validate_as(model: type[M], raw: Any, overrides: list[str] | tuple[str, ...], what: str) -> M:
    """``raw`` (a mapping) with ``--set`` overrides applied, validated by ``model``: the one path of
    every kind's spec (``what``: its name), errors rendered by field_errors. An empty file is an
    empty mapping (every field at its default)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"a {what} spec must be a mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"invalid {what} spec:\n  " + "\n  ".join(field_errors(e.errors()))) from None


def read_yaml(path: str | Path) -> Any:
    """A spec file's YAML, or SpecError naming the file (unreadable, not YAML)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"spec {path} is not valid YAML: {e}") from None
