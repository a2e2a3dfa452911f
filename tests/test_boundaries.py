"""Import rules and room sizes over every product package (the control plane's own rules, no shell
strings and no unpickling, are in tests/orchestrator/test_boundaries.py).

- the control plane (orchestrator/) imports no torch and reaches workers only through jobs/;
- workers/ import nothing from jobs/ or orchestrator/ (they run inside Ray workers);
- the model (workers/moe/model.py) is plain PyTorch: no Ray, no torch.distributed;
- jobs/ reach the model only through workers/ (no workers.moe import);
- no import circle among product modules: every import counts, at module level, inside functions and
  under ``if TYPE_CHECKING:`` (a circle there is still two modules that each need the other);
  ``from package import submodule`` is an arrow to the submodule only, and a submodule's import of
  its own package's ``__init__`` is not drawn (Python imports the package first anyway);
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


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SOURCES}


def _arrows(name: str, path: Path) -> set[str]:
    """The product modules ``name`` imports (relative imports resolved)."""
    out = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            subs = {f"{module}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs
            if module in MODULES and len(subs) < len(node.names):
                out.add(module)
    return out - {name}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_no_import_circles():
    circles = _circles({name: _arrows(name, path) for name, path in MODULES.items()})
    assert not circles, f"import circles (rules: tests/test_boundaries.py): {circles}"


def test_circle_finder_sees_function_level_and_type_checking_imports(tmp_path, monkeypatch):
    """The checker itself: a circle closed only inside a function or under TYPE_CHECKING is found."""
    sources = {"workers.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workers.b import X\n",
               "workers.b": "def f():\n    import workers.c\n",
               "workers.c": "from workers import a\n"}
    for name, text in sources.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        monkeypatch.setitem(MODULES, name, path)
    graph = {name: _arrows(name, MODULES[name]) for name in sources}
    assert graph == {"workers.a": {"workers.b"}, "workers.b": {"workers.c"}, "workers.c": {"workers.a"}}
    assert _circles(graph) == [["workers.a", "workers.b", "workers.c"]]
