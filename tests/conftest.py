import os
import subprocess
import sys
from pathlib import Path

import pytest

# The control plane's fixtures (settings, fake_ray, app, client) for every test folder.
pytest_plugins = ["tests.support.control_plane"]

# Ray Train's controller registers a report, and so commits a checkpoint (which the loop waits for),
# when it next polls its workers: every 2 s by default. Every Train run of the suite pays that wait at
# each checkpoint and at its end; the drivers and Ray heads that tests start inherit this setting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "examples" / "demo.yaml"

# A tiny but real run of the demo spec: the stdlib corpus capped at 300 KB, a 1-layer model.
TINY = [
    "train.batch_size=4", "train.log_every=5", "train.warmup_steps=5", "train.eval_batches=2",
    "data.max_bytes=300000", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.expert_hidden=32",
]


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory) -> Path:
    """One shard cache for every test run of the tiny spec (built by the first run)."""
    return tmp_path_factory.mktemp("shards")


@pytest.fixture(scope="module")
def pool_cluster():
    """A multi-node Ray cluster with nodes of several pools (tests/support/cluster.py), one per test module:
    it is torn down before the next module, whose tests start Ray their own way."""
    from tests.support.cluster import PoolCluster

    cluster = PoolCluster()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def train_ray():
    """A local Ray cluster with room for 2 training workers and Ray Data's tasks, started by this
    module unless the session already has one (then that one is used)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """The session's one S3-protocol server on loopback (moto; tests/support/servers.py)."""
    from tests.support.servers import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server, with this test's AWS_* environment pointing at it."""
    import uuid

    import pyarrow.fs as pafs

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server.endpoint, region=s3_server.REGION,
                      allow_bucket_creation=True).create_dir(bucket)
    return bucket


def run_train(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`python -m jobs.train ...` as a user runs it; never inherits a cluster address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def pytest_configure(config):
    config.addinivalue_line("markers", "fresh_process: needs a test process in which Ray never started; runs first")


def pytest_collection_modifyitems(config, items):
    """Run order, by module: ``fresh_process`` modules, then modules without a ``ray`` test, then the
    rest. Ray caches its auth settings per process: the autoscale test's in-process driver joins a
    token-auth head, which fails once any test of this process has started Ray without a token
    (``ray.init(address="local")``, the ``train_ray`` and ``pool_cluster`` fixtures, Serve). A module
    keeps its place in one group, so its module-scoped fixtures start once."""
    fresh, ray = set(), set()
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.get_closest_marker("fresh_process"):
            fresh.add(module)
        if item.get_closest_marker("ray"):
            ray.add(module)

    def rank(item) -> int:
        module = item.nodeid.split("::")[0]
        return 0 if module in fresh else 2 if module in ray else 1

    items.sort(key=rank)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once every report is written, without Python's finalization: the suite
    starts Ray, Serve and gRPC in this process many times, and a native thread still alive at
    interpreter exit crashed it once (a segfault after "1306 passed", which failed `make test`)."""
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
