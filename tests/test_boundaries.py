"""Import rules and room sizes over every product package (the control plane's own rules, no shell
strings and no unpickling, are in tests/orchestrator/test_boundaries.py).

- the control plane (orchestrator/) imports no torch and reaches workers only through jobs/;
- workers/ import nothing from jobs/ or orchestrator/ (they run inside Ray workers);
- the model (workers/moe/model.py) is plain PyTorch: no Ray, no torch.distributed;
- jobs/ reach the model only through workers/ (no workers.moe import);
- no source file in workers/, jobs/ or orchestrator/ over MAX_LINES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "workers", "jobs")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts)
MAX_LINES = 400
# package (or module) -> import prefixes it must not use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "orchestrator": ("torch", "workers"),
    "workers": ("jobs", "orchestrator"),
    "workers/moe/model.py": ("ray", "torch.distributed"),
    "jobs": ("orchestrator", "workers.moe"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _rules(path: Path) -> tuple[str, ...]:
    rel = path.relative_to(ROOT).as_posix()
    return tuple(p for key, prefixes in FORBIDDEN.items() if rel == key or rel.startswith(key + "/")
                 for p in prefixes)


def _uses(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_import_rules(path):
    bad = sorted(n for n in _imports(path) for p in _rules(path) if _uses(n, p))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} (rules: tests/test_boundaries.py)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_room_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_rules_catch_a_violation(tmp_path):
    """The checker itself: a model file importing ray is caught."""
    fake = ROOT / "workers" / "moe" / "model.py"
    assert _rules(fake) == ("jobs", "orchestrator", "ray", "torch.distributed")
    probe = tmp_path / "m.py"
    probe.write_text("import ray.train\nfrom torch.distributed import all_reduce\nfrom . import x\n")
    assert {n for n in _imports(probe) if any(_uses(n, p) for p in _rules(fake))} == {"ray.train",
                                                                                     "torch.distributed"}
