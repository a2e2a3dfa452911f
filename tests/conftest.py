import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_train(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`python -m jobs.train ...` as a user runs it; never inherits a cluster address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
