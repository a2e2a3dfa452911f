"""Issue 20, point 2 end to end: a real training run (`python -m jobs.train` on its embedded Ray
cluster, the tiny spec) of a team whose corpus holds a link to another team's file. With the team's
roots in ORCH_DATA_ROOTS (as the controller sets them), the run finishes, says it skipped the link,
and no shard it trained on holds a byte of the other team's file."""

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO, ROOT, TINY
from workers.confine import ROOTS_ENV

pytestmark = pytest.mark.ray

RUN_TIMEOUT_S = 420


def test_a_training_run_under_its_roots_never_reads_a_file_linked_out(tmp_path):
    team, other = tmp_path / "team", tmp_path / "other"
    corpus = team / "corpus"
    corpus.mkdir(parents=True)
    other.mkdir()
    for i in range(40):  # ~240 KB of the team's own code
        (corpus / f"m{i:02d}.py").write_text(f"def team_code_{i}(x):\n    return x * {i} + 1\n" * 150)
    secret = f"OTHER-TEAM-{uuid.uuid4().hex}"
    (other / "api_token.py").write_text(f"TOKEN = '{secret}'\n" * 20)
    (corpus / "x.py").symlink_to(other / "api_token.py")

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[ROOTS_ENV] = json.dumps([str(team)])
    # One worker: what is read is decided where the shards are built (the driver); a second worker
    # would only add its start-up.
    sets = [*TINY, f"data.source={corpus}", f"data.path={team / 'shards'}", "data.shard_tokens=16384",
            "train.steps=10", "train.checkpoint_every=10", "resources.num_workers=1"]
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--spec", str(DEMO), "--out", str(team / "out"),
                        "--no-sample", *[a for s in sets for a in ("--set", s)]],
                       cwd=ROOT, env=env, text=True, capture_output=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipped 1 file linked outside the data roots" in r.stdout, r.stdout[-3000:]
    assert json.loads((team / "out" / "summary.json").read_text())["steps"] == 10

    shards = sorted((team / "shards").rglob("*.parquet"))
    assert shards
    table = pq.read_table(shards)
    text = b"".join(np.asarray(t, dtype=np.uint16).astype(np.uint8).tobytes()
                    for t in table.column("tokens").to_pylist())
    assert all(f"team_code_{i}(".encode() in text for i in range(40))  # real shard contents, every file
    assert secret.encode() not in text and "x.py" not in table.column("path").to_pylist()
