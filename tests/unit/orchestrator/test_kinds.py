"""The job-kind contract (jobs/kinds/): each kind states its own rules, and the control plane reads
them from the kind, so a new kind is one file and one registry line."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel

from jobs import kinds
from jobs.contracts.demand import job_demand
from jobs.kinds import KINDS, Bundle, JobKind, job_kind, kind_of
from jobs.specs.serve import ServeSpec
from jobs.specs.sweep import SweepSpec
from orchestrator.auth import root_violations
from orchestrator.controller.demand_groups import demand_group
from orchestrator.controller.stop_checkpoint import StopCheckpoints
from tests.support.control_plane import AUTH, TINY_SPEC


def _field_exists(model: type[BaseModel], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return False
        model = info.annotation
    return last in model.model_fields


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda k: k.name)
def test_every_kind_names_path_fields_its_spec_has(kind):
    assert all(_field_exists(kind.spec, f) for f in kind.path_fields), kind.path_fields


def test_a_kind_stopped_at_once_must_say_how_it_resumes():
    with pytest.raises(ValueError, match="how it resumes"):
        JobKind("x", "jobs.x", BaseModel, "x", path_fields=(), demand=lambda s: ())


def test_a_sweeps_demand_group_holds_each_concurrent_trials_gpu_workers():
    """The autoscaler sees a GPU sweep's devices (it saw 1-CPU bundles only, before kinds carried
    their bundles)."""
    spec = SweepSpec.model_validate({"base": {**TINY_SPEC, "resources": {"device": "gpu", "cpus_per_worker": 2}},
                                     "max_concurrent": 3, "workers_per_trial": 2,
                                     "space": {"train.lr": {"type": "choice", "values": [0.1, 0.2]}}})
    bundles = [dict(b) for b in demand_group(job_kind("sweep").demand(spec), {"head": 0.01}).bundles]
    assert bundles.count({"CPU": 2.0, "GPU": 1.0}) == 6  # 3 trials x 2 workers
    assert job_demand(spec, {"head": 0.01}) == {"gpu": {"CPU": 15.0, "GPU": 6.0, "head": 0.01}}


@pytest.fixture
def echo_kind(monkeypatch):
    """A new kind, as its own file would define it, added to the registry."""
    class EchoSpec(BaseModel):
        name: str = "echo"
        where: str
    kind = JobKind("echo", "jobs.echo", EchoSpec, "echo", path_fields=("where",),
                   demand=lambda s: (Bundle("cpu", {"CPU": 1.0}),), resumes="an echo has no state")
    monkeypatch.setitem(KINDS, "echo", kind)
    return kind


def test_a_new_kind_brings_its_path_fields_demand_and_stop(echo_kind, settings, tmp_path):
    problems = root_violations("echo", {"where": "/elsewhere"}, [str(tmp_path)])
    assert [f for f, _ in problems] == ["where"]
    assert job_demand(echo_kind.spec(where="/x"), {"CPU": 0.5}) == {"cpu": {"CPU": 1.5}}
    stops = StopCheckpoints(settings, clock=lambda: 0.0)
    assert stops.ready("j1", "sub-1", "cancelled by user", "echo")  # at once: nothing is asked
    assert stops.note("j1") == "no checkpoint asked (an echo has no state)"
    assert not (settings.job_root / "j1").exists()  # no request was written


def test_only_resizable_kinds_resize(client, monkeypatch):
    job = client.post("/v1/jobs", json={"kind": "train", "spec": TINY_SPEC}, headers=AUTH).json()
    monkeypatch.setitem(KINDS, "train", dataclasses.replace(kinds.train.KIND, resizable=False))
    r = client.patch(f"/v1/jobs/{job['id']}", json={"num_workers": 4}, headers=AUTH)
    assert r.status_code == 422 and "train jobs cannot be resized" in r.text


def test_a_spec_that_extends_a_kinds_spec_is_of_that_kind():
    class Options(ServeSpec):  # as a deployment's options extend serve's spec
        pass

    assert kind_of(Options(checkpoint="/c")) is KINDS["serve"]
    assert job_demand(Options(checkpoint="/c", num_cpus=0.5)) == {"cpu": {"CPU": 0.5}}
