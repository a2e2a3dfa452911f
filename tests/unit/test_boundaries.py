"""Import rules and room sizes over every product package (and, at the end,
the control plane's own: no shell strings, no unpickling, an entry-point allow-list).

- the control plane (orchestrator/) imports no torch and reaches workers only through jobs/, except
  for ALLOWED leaves: modules that import only the standard library (the one bounded wait,
  ``workers.waiting``), so importing them pulls in no worker code;
- workers/ import nothing from jobs/ or orchestrator/ (they run inside Ray workers);
- the model (workers/moe/model.py) is plain PyTorch: no Ray, no torch.distributed;
- jobs/ reach the model only through workers/ (no workers.moe import);
- no import circle among product modules: every import counts, at module level, inside functions and
  under ``if TYPE_CHECKING:`` (a circle there is still two modules that each need the other);
  ``from package import submodule`` is an arrow to the submodule only, and a submodule's import of
  its own package's ``__init__`` is not drawn (Python imports the package first anyway);
- jobs/'s torch-free packages (TORCH_FREE_JOBS: every module in their folders, so a new file is
  covered as it lands) import without torch (a subprocess where torch cannot be imported), as the
  control plane itself does, and the control plane imports jobs/ only from them (never the runtime
  builders or the entry points);
- no source file in workers/, jobs/ or orchestrator/ over MAX_LINES.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.kinds import KINDS
from orchestrator.controller.entrypoints import ALLOWED_ENTRYPOINTS, build_entrypoint, job_paths

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "workers", "jobs")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts)
MAX_LINES = 400
# jobs/ packages the control plane may import: specs, contracts and the kind registry. It runs where torch
# is not installed, so every module in these folders imports without it.
TORCH_FREE_JOBS = ("jobs/specs", "jobs/contracts", "jobs/kinds")
# package (or module) -> import prefixes it must not use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "orchestrator": ("torch", "workers"),
    "workers": ("jobs", "orchestrator"),
    "workers/moe/model.py": ("ray", "torch.distributed"),
    "jobs": ("orchestrator", "workers.moe"),
    # the torch-free packages never reach the runtime builders or the entry points
    **{folder: ("jobs.runtime", "jobs.train", "jobs.serve", "jobs.sweep", "jobs.prepare") for folder in TORCH_FREE_JOBS},
}
# package -> modules it may import although FORBIDDEN names their prefix; each must be a stdlib-only leaf
ALLOWED: dict[str, tuple[str, ...]] = {
    "orchestrator": ("workers.waiting",),
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


def _allowed(path: Path) -> tuple[str, ...]:
    rel = path.relative_to(ROOT).as_posix()
    return tuple(m for key, modules in ALLOWED.items() if rel.startswith(key + "/") for m in modules)


def _uses(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(path: Path, names: set[str]) -> list[str]:
    """The imported ``names`` that ``path``'s rules forbid and no ALLOWED entry excuses."""
    return sorted(n for n in names for p in _rules(path) if _uses(n, p) and n not in _allowed(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_import_rules(path):
    bad = _violations(path, _imports(path))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} (rules: tests/unit/test_boundaries.py)"


@pytest.mark.parametrize("module", sorted({m for modules in ALLOWED.values() for m in modules}))
def test_allowed_leaves_import_only_the_standard_library(module):
    """An exception to the arrows is safe only while the module, and the packages Python imports
    before it (their ``__init__``), pull in nothing but the stdlib."""
    parts = module.split(".")
    for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
        path = MODULES[name]
        foreign = sorted(n for n in _imports(path) if n.split(".")[0] not in sys.stdlib_module_names)
        relative = [node.level for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level]
        assert not foreign and not relative, \
            f"{name} imports {foreign or 'relative modules'}: importing {module} must stay stdlib-only"


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


def test_allowed_leaf_is_the_only_exception(tmp_path):
    """The checker itself: orchestrator/ may import workers.waiting, and still no other worker module."""
    probe = tmp_path / "probe.py"
    probe.write_text("from workers.waiting import wait_until\nimport workers.loop\nfrom workers import step\n")
    names = _imports(probe)
    assert _violations(ROOT / "orchestrator" / "cli" / "probe.py", names) == ["workers", "workers.loop"]
    assert _violations(ROOT / "jobs" / "probe.py", names) == []  # jobs/ may import workers/


def test_no_import_circles():
    circles = _circles({name: _arrows(name, path) for name, path in MODULES.items()})
    assert not circles, f"import circles (rules: tests/unit/test_boundaries.py): {circles}"


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


# Imports each module named in argv with torch made unimportable; prints {module: where torch was
# imported from} for those that failed (the deepest traceback frame in one of the source roots, argv[1]).
_IMPORT_WITHOUT_TORCH = """
import importlib, json, os, sys, traceback
roots = sys.argv[1].split(os.pathsep)

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not installed here ({name})")

sys.meta_path.insert(0, NoTorch())
failed = {}
for module in sys.argv[2:]:
    try:
        importlib.import_module(module)
    except ImportError as e:
        ours = [(os.path.relpath(f.filename, r), f.lineno) for f in traceback.extract_tb(e.__traceback__)
                for r in roots if f.filename.startswith(r + os.sep) and "/.venv/" not in f.filename]
        failed[module] = "%s:%d" % ours[-1] if ours else str(e)
print(json.dumps(failed))
"""


def _import_without_torch(modules: list[str], extra_path: Path | None = None) -> dict[str, str]:
    roots = os.pathsep.join(str(p) for p in (ROOT, extra_path) if p)
    r = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT_TORCH, roots, *modules], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": roots}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _torch_free_jobs_modules(root: Path = ROOT) -> list[str]:
    """Every module in the TORCH_FREE_JOBS folders under ``root`` (each folder must exist: a rename
    fails here rather than checking nothing)."""
    found = []
    for folder in TORCH_FREE_JOBS:
        assert (root / folder / "__init__.py").is_file(), f"{folder} (TORCH_FREE_JOBS) is no package"
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _outside_torch_free_jobs(name: str, path: Path) -> list[str]:
    """The jobs/ modules ``name`` imports outside the TORCH_FREE_JOBS packages (the ``jobs`` package
    itself, a docstring, is no arrow)."""
    packages = tuple(folder.replace("/", ".") for folder in TORCH_FREE_JOBS)
    return sorted(m for m in _arrows(name, path) if _uses(m, "jobs") and m != "jobs"
                  and not any(_uses(m, p) for p in packages))


def test_jobs_torch_free_packages_import_without_torch():
    modules = _torch_free_jobs_modules()
    assert {"jobs.specs.train", "jobs.contracts.training", "jobs.kinds"} <= set(modules)
    failed = _import_without_torch(modules)
    assert not failed, f"these jobs/ modules import torch (module: where), defer it to a function: {failed}"


def test_the_torch_free_packages_cover_a_new_file(tmp_path):
    """The checker itself: a module added to one of the folders is among those imported without torch."""
    for folder in TORCH_FREE_JOBS:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "jobs" / "contracts" / "new_record.py").write_text("")
    assert "jobs.contracts.new_record" in _torch_free_jobs_modules(tmp_path)


@pytest.mark.parametrize("path", [p for p in SOURCES if p.relative_to(ROOT).parts[0] == "orchestrator"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_control_plane_imports_only_torch_free_jobs_packages(path):
    bad = _outside_torch_free_jobs(_module(path), path)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the control plane may import {TORCH_FREE_JOBS} only"


def test_torch_free_rule_catches_runtime_and_entry_point_imports(tmp_path):
    """The checker itself: a runtime builder or an entry point is caught, however it is imported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from jobs.runtime.trainer import build_trainer\nfrom jobs import runtime, kinds\n"
                     "import jobs.train\nfrom jobs.specs.serve import ServeSpec\nfrom jobs.contracts import pools\n")
    assert _outside_torch_free_jobs("orchestrator.probe", probe) == ["jobs.runtime", "jobs.runtime.trainer",
                                                                     "jobs.train"]
    # and inside jobs/, a torch-free package may not import them either
    names = {"jobs.runtime.trainer", "jobs.train", "jobs.specs.serve", "jobs.contracts.pools"}
    assert _violations(ROOT / "jobs" / "contracts" / "probe.py", names) == ["jobs.runtime.trainer", "jobs.train"]


def test_the_torch_blocker_catches_an_import_and_names_where(tmp_path):
    """The checker itself: a module importing torch at its top fails, and the line that did is named."""
    (tmp_path / "probe_uses_torch.py").write_text("import json\nimport torch\n")
    failed = _import_without_torch(["jobs.specs", "probe_uses_torch"], extra_path=tmp_path)
    assert failed == {"probe_uses_torch": "probe_uses_torch.py:2"}


# The control plane's own rules: no shell strings, no unpickling, a fixed entry-point
# allow-list with quoted paths, and a service that starts without torch.

ORCH = ROOT / "orchestrator"


ORCH_SOURCES = sorted(ORCH.rglob("*.py"))  # migrations included


@pytest.mark.parametrize("path", ORCH_SOURCES, ids=lambda p: str(p.relative_to(ORCH)))
def test_no_shell_strings_no_pickle_no_eval(path):
    tree = ast.parse(path.read_text())
    assert not {"pickle", "cloudpickle", "dill", "marshal", "shelve"} & {n.split(".")[0] for n in _imports(path)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            assert name not in ("eval", "exec", "system", "popen"), f"{path.name}:{node.lineno} calls {name}"
            for kw in node.keywords:
                is_true = isinstance(kw.value, ast.Constant) and kw.value.value is True
                assert not (kw.arg == "shell" and is_true), f"{path.name}:{node.lineno} uses shell=True"


def test_importing_the_service_does_not_import_torch():
    """The control plane runs where torch is not installed. This needs jobs.specs to reach only the
    workers' pydantic configs (not modules that import torch at the top)."""
    code = ("import sys; import orchestrator.api.app, orchestrator.cli, orchestrator.controller.loop; "
            "bad = sorted(m for m in ('torch', 'workers.loop', 'workers.compression', 'workers.moe.model') "
            "if m in sys.modules); print(bad); sys.exit(1 if 'torch' in bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"torch was imported via {r.stdout.strip()}"


def test_entrypoint_is_the_allow_listed_module_with_quoted_paths(tmp_path):
    root = tmp_path / "state dir; rm -rf ~"
    cmd = build_entrypoint("train", job_paths(root, "abc123"), "python")
    assert shlex.split(cmd) == ["python", "-m", "jobs.train", "--spec", str(root / "abc123" / "spec.json"),
                                "--out", str(root / "abc123" / "out")]
    # Exactly the registered kinds' modules, each a module under jobs/: a client chooses a kind, never a command.
    assert ALLOWED_ENTRYPOINTS == {name: kind.module for name, kind in KINDS.items()}
    assert all(module.startswith("jobs.") for module in ALLOWED_ENTRYPOINTS.values())
    with pytest.raises(ValueError):
        build_entrypoint("shell", job_paths(root, "abc123"))
    with pytest.raises(ValueError):
        job_paths(root, "../etc")
