"""Integration: the real entry point on a real embedded Ray cluster, 2 workers, top-k hook."""

import json

import pytest

from tests.conftest import DEMO, TINY, run_train
from workers.progress import parse_progress

pytestmark = pytest.mark.ray


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shards_dir):
    out = tmp_path_factory.mktemp("run")
    r = run_train("--spec", str(DEMO), "--out", str(out), *_sets(*TINY, f"data.path={shards_dir}",
                  "train.steps=30", "train.checkpoint_every=10"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_loss_decreases_with_topk_sync_on_two_workers(first_run):
    out, r = first_run
    summary = json.loads((out / "summary.json").read_text())
    progress = [p for p in map(parse_progress, r.stdout.splitlines()) if p]
    assert [p["step"] for p in progress] == [5, 10, 15, 20, 25, 30]
    assert summary["world_size"] == 2 and summary["steps"] == 30
    assert summary["final_loss"] < progress[0]["loss"] - 0.5  # from ~5.5 (uniform over bytes) downwards
    assert summary["eval_loss"] is not None and summary["eval_loss"] < progress[0]["loss"]
    # Byte accounting: 1% density with int32 index + fp32 value per kept element vs dense fp32 ring
    # allreduce gives dense/wire = 1 / (2 * 0.01) = 50 at world size 2, less ceil() rounding per bucket.
    assert summary["wire_bytes"] > 0 and summary["dense_bytes"] / summary["wire_bytes"] >= 40
    assert summary["compression"] == pytest.approx(summary["dense_bytes"] / summary["wire_bytes"])
    assert len(summary["moe"]["max_vio"]) == 1 and summary["moe"]["drop_frac"][0] >= 0
    assert len(summary["samples"]) == 3 and summary["samples"][0].startswith("def ")


def test_rerun_with_same_out_resumes_from_latest_checkpoint(first_run, shards_dir):
    out, _ = first_run
    r = run_train("--spec", str(DEMO), "--out", str(out), "--no-sample", *_sets(*TINY, f"data.path={shards_dir}",
                  "train.steps=40", "train.checkpoint_every=10"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from step 30" in r.stdout
    steps = [p["step"] for p in map(parse_progress, r.stdout.splitlines()) if p]
    assert steps == [35, 40]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["wire_bytes"] > 0
