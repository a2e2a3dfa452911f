"""The serve spec and the entry point's checks that need no Ray: bounds naming the field, a run
folder resolving to its newest checkpoint, the registry entry, exit code 2 on a bad spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.kinds import job_kind
from jobs.specs.base import SpecError
from jobs.specs.serve import load_serve_spec, resolve_checkpoint, validate_serve_spec

ROOT = Path(__file__).resolve().parents[3]


def test_example_spec_validates_and_is_registered():
    spec = load_serve_spec(ROOT / "jobs" / "examples" / "serve.yaml")
    assert spec.prefix == "/demo" and spec.autoscaling.max_replicas == 2
    assert job_kind("serve").spec is type(spec) and job_kind("serve").module == "jobs.serve"


@pytest.mark.parametrize(("raw", "field"), [
    ({"checkpoint": "x", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
    ({"checkpoint": "x", "batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"checkpoint": "x", "key_sha256": "not-a-hash"}, "key_sha256"),
    ({"checkpoint": "x", "api_key": "plain"}, "api_key"),  # a plain key is not a spec field
    ({"checkpoint": "x", "route_prefix": "no-slash"}, "route_prefix"),
])
def test_bad_fields_are_named(raw, field):
    with pytest.raises(SpecError, match=field):
        validate_serve_spec(raw)


def test_a_run_folder_resolves_to_its_newest_checkpoint(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / "ray-train" / f"step-{step:08d}").mkdir(parents=True)
        (tmp_path / "ray-train" / f"step-{step:08d}" / "meta.json").write_text("{}")
    assert resolve_checkpoint(tmp_path).name == "step-00000010"
    assert resolve_checkpoint(tmp_path / "ray-train" / "step-00000002").name == "step-00000002"
    with pytest.raises(SpecError, match="checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_cli_rejects_a_bad_spec_before_ray(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\ncheckpoint: y\nbatching: {max_batch_size: 100000}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--spec", str(spec)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "batching.max_batch_size" in proc.stderr
