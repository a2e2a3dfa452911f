"""Integration: every training sequence of an epoch is applied exactly once across a worker kill and
a resize 2 -> 1 (real TorchTrainer, real Ray Data, a prepared dataset, the tiny model).

Run 1 trains on 2 workers and checkpoints every CHECKPOINT_EVERY steps; rank 1's process exits
abruptly once it has trained KILL_AFTER_STEP steps, so fit() fails (max_failures 0). Run 2 resumes
the same run folder on 1 worker and finishes. Each rank records the sequences it trains on
(workers/loop.py, RECORD_SEQUENCES_ENV). What survives is run 1's steps before the checkpoint
run 2 resumed from, plus run 2's steps: those must cover the order's first sequences, each once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jobs.specs import load_spec
from jobs.trainer import RUN_NAME, build_trainer
from tests.conftest import DEMO, TINY

pytestmark = pytest.mark.ray

STEPS = 12
CHECKPOINT_EVERY = 4
KILL_AFTER_STEP = 5  # rank 1 dies once it has trained this step (after the checkpoint at step 4)
BATCH = 4  # train.batch_size in TINY: sequences per worker per step
KILL_POLL_S = 0.05
REGISTER_TIMEOUT_S = 120  # for Ray Train to register the checkpoint at step 4 before the kill


def _recording_loop(config: dict) -> None:
    """The product's loop, with the sequence log on (set in the worker's own process)."""
    from workers.loop import RECORD_SEQUENCES_ENV, train_loop_per_worker

    os.environ[RECORD_SEQUENCES_ENV] = "1"
    train_loop_per_worker(config)


def _killed_loop(config: dict) -> None:
    """Rank 1 exits abruptly right after it has trained KILL_AFTER_STEP, once Ray Train has registered
    the checkpoint before it: a result reported by the workers is registered when the controller next
    polls them, and a worker group that dies first loses it (the test would then resume from 0)."""
    import ray.train

    from workers import loop

    out = Path(config["worker"]["control_dir"])
    record = loop._SequenceLog.add

    def add_then_die(self, step: int, *args) -> None:
        record(self, step, *args)
        if self.rank == 1 and step == KILL_AFTER_STEP:
            snapshot = out / RUN_NAME / "checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while time.monotonic() < deadline and not (snapshot.exists() and "step-" in snapshot.read_text()):
                time.sleep(KILL_POLL_S)
            os._exit(1)  # as a crash or an OOM kill: no cleanup, no checkpoint

    if ray.train.get_context().get_world_rank() == 1:
        loop._SequenceLog.add = add_then_die
    _recording_loop(config)


def _unique_corpus(root: Path) -> Path:
    """Text whose packed sequences all differ (every line is unique), so a CRC names a sequence."""
    src = root / "corpus"
    src.mkdir()
    for f in range(12):
        (src / f"mod{f:02d}.py").write_text("".join(f"v_{f}_{i} = {f * 7919 + i * 104729}\n" for i in range(120)))
    return src


def _records(files: set[Path]) -> list[dict]:
    return [json.loads(line) for f in sorted(files) for line in f.read_text().splitlines()]


def test_worker_kill_then_resize_applies_every_sequence_once(train_ray, tmp_path):
    from workers.checkpoint import load_tokenizer_for
    from workers.corpus import PrepareConfig, prepare
    from workers.data import open_training_data

    prepared = tmp_path / "prepared"
    prepare(PrepareConfig(source=str(_unique_corpus(tmp_path)), path=str(prepared), shard_bytes=8192,
                          val_fraction=0.1), log=lambda _: None)
    sets = [*TINY, f"data.path={prepared}", "data.seq_len=32", f"train.steps={STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=4", "resources.max_failures=0"]
    spec = load_spec(DEMO, sets)
    data = open_training_data(spec.data, spec.model.vocab_size, log=lambda _: None)
    out = tmp_path / "out"
    ids = out / "sequence-ids"

    with pytest.raises(Exception):  # noqa: B017 (Ray Train's own error type wraps the worker's death)
        build_trainer(spec, data, out, train_loop=_killed_loop).fit()
    first = set(ids.glob("*.jsonl"))
    result = build_trainer(load_spec(DEMO, [*sets, "resources.num_workers=1"]), data, out,
                           train_loop=_recording_loop).fit()
    run1, run2 = _records(first), _records(set(ids.glob("*.jsonl")) - first)

    assert {r["rank"] for r in run1} == {0, 1} and {r["rank"] for r in run2} == {0}
    assert max(r["step"] for r in run1) >= KILL_AFTER_STEP  # the kill came mid-epoch, after a checkpoint
    resume = min(r["step"] for r in run2)
    assert resume == CHECKPOINT_EVERY  # the checkpoint registered before the kill
    assert sorted(r["step"] for r in run2) == list(range(resume, STEPS))
    kept = [r for r in run1 if r["step"] < resume]
    assert sorted(r["step"] for r in kept) == sorted([*range(resume)] * 2)

    # The surviving lineage trains the order's first sequences, each exactly once, none skipped.
    applied = {(r["epoch"], r["first"] + i): crc for r in kept + run2 for i, crc in enumerate(r["crc"])}
    total = resume * 2 * BATCH + (STEPS - resume) * BATCH
    assert len(applied) == sum(len(r["crc"]) for r in kept + run2) == total
    assert sorted(applied) == [(0, i) for i in range(total)]
    assert len(set(applied.values())) == total  # distinct sequences, not only distinct indices
    # The steps run 1 lost to the kill are retrained by run 2 on the same sequences (one order on
    # any world size), which run 2 cuts into batches of 4 instead of 2 x 4.
    lost = {(r["epoch"], r["first"] + i): crc for r in run1 if r["step"] >= resume for i, crc in enumerate(r["crc"])}
    assert lost and all(applied[key] == crc for key, crc in lost.items() if key in applied)

    assert result.metrics["world_size"] == 1
    assert load_tokenizer_for(Path(result.checkpoint.path)).kind == "bytes"
    assert (Path(result.checkpoint.path) / "tokenizer.json").is_file()
