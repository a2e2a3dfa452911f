"""The entry points (``python -m jobs.<kind>``) defer Ray and torch to after the spec validates
(jobs/runtime/ is imported inside ``main``): ``--help`` and a bad spec answer at once, with exit 2,
in a process that never loaded either."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.unit.test_boundaries import ROOT

ENTRY_POINTS = ("jobs.train", "jobs.serve", "jobs.sweep", "jobs.prepare")
# Runs ``module.main(["--spec", <missing file>])`` and prints its exit code and the heavy modules loaded.
_RUN_WITH_A_MISSING_SPEC = """
import importlib, json, sys
code = importlib.import_module(sys.argv[1]).main(["--spec", sys.argv[2]])
print(json.dumps({"code": code, "loaded": sorted(m for m in ("ray", "torch") if m in sys.modules)}))
"""


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_bad_spec_answers_before_ray_and_torch_load(module, tmp_path):
    r = subprocess.run([sys.executable, "-c", _RUN_WITH_A_MISSING_SPEC, module, str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"code": 2, "loaded": []}
    assert "missing.yaml" in r.stderr  # the error names the file


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_names_the_command(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0 and f"python -m {module}" in r.stdout, r.stderr
