"""The embedded cluster starts its actors without importing torch first (issue 23, trial start-up).

A sweep trial's Train run starts about eleven actors, each in a new Python process (Ray places no
actor on the idle workers it starts ahead), and only the controller and the worker use torch. With
torch in Ray's preload_python_modules every one of them imported it before taking its first call,
seconds each on a loaded machine (tests/bench/sweeps.py measures the trials before and after). The
test starts the cluster jobs.sweep and jobs.train start (jobs.runtime.trainer.init_ray) and looks inside a
new actor and a new task: neither may have torch imported before it ran.
"""

from __future__ import annotations

import sys

import pytest

from jobs.specs.train import TrainSpec

pytestmark = pytest.mark.ray


def test_new_actors_and_tasks_of_the_embedded_cluster_start_without_torch():
    import ray

    from jobs.runtime.trainer import init_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def modules(self) -> bool:
            return "torch" in sys.modules

    @ray.remote(num_cpus=0)
    def task_modules() -> bool:
        return "torch" in sys.modules

    init_ray(TrainSpec.model_validate({"resources": {"num_workers": 1}}), verbose=False)
    try:
        actor = Probe.remote()
        assert ray.get(actor.modules.remote(), timeout=120) is False
        assert ray.get(task_modules.remote(), timeout=120) is False
    finally:
        ray.shutdown()
