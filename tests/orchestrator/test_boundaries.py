"""Package boundaries of the control plane: no shell strings, no unpickling, a fixed entry-point
allow-list with quoted paths, and no torch imported at run time (its import rules, no torch and no
workers, are tests/test_boundaries.py's, with every other package's)."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.kinds import KINDS
from orchestrator.controller.entrypoints import ALLOWED_ENTRYPOINTS, build_entrypoint, job_paths

ORCH = Path(__file__).resolve().parents[2] / "orchestrator"
SOURCES = sorted(ORCH.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ORCH)))
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
