"""infra/Dockerfile, read as text (no docker build here): it installs the project with `make install`
and the Makefile's torch pin, copies only sources, and its ignore file keeps .venv and runs out."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.unit.infra.support import INFRA, ROOT

DOCKERFILE = INFRA / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore beside a Dockerfile given with -f.
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_runs_make_install():
    runs = [args for op, args in instructions() if op == "RUN"]
    assert any(re.search(r"\bmake install\b", r) for r in runs)


@pytest.mark.parametrize("forbidden", [".venv", "runs"])
def test_copies_no_environment_or_run_outputs(forbidden):
    for op, args in instructions():
        if op in ("COPY", "ADD"):
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            assert all(s.strip("./") != forbidden and s not in (".", "./") for s in sources), args
    ignored = {line.strip().strip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert forbidden in ignored


def test_copies_what_make_install_needs():
    copied = {s for op, args in instructions() if op == "COPY" for s in shlex.split(args)[:-1]}
    for needed in ("pyproject.toml", "Makefile", "README.md", "orchestrator", "workers", "jobs"):
        assert needed in copied


def test_torch_pin_matches_the_makefile_and_cuda_is_a_build_arg():
    args = dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)
    pin = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH"] == pin
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # the default build is the CPU one
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in DOCKERFILE.read_text()


def test_runs_as_a_user_with_the_venv_on_path():
    ops = instructions()
    assert ("USER", "ray") in ops
    env = " ".join(a for op, a in ops if op == "ENV")
    assert "PATH=/app/.venv/bin:" in env
