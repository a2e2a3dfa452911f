"""Integration: every training sequence of an epoch is applied exactly once across a worker kill and
resizes 2 -> 1 -> 3 (real TorchTrainer, real Ray Data read tasks, a prepared dataset in small row
groups, the tiny model), each worker reading only its own units.

Run 1 trains on 2 workers and checkpoints every CHECKPOINT_EVERY steps; rank 1's process exits
abruptly once it has trained KILL_AFTER_STEP steps, so fit() fails (max_failures 0). Run 2 resumes
the same run folder on 1 worker up to RUN2_STEPS; run 3 resumes on 3 workers past the end of the
epoch. Each rank records the sequence ids it trains on (``_SequenceLog``, the loop's ``on_batch``). What
survives is run 1's steps before the checkpoint run 2 resumed from, plus runs 2 and 3: they must
hold every sequence of epoch 0 once, but for fewer than one global batch left at its end.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import pytest

from jobs.runtime.trainer import RUN_NAME, build_trainer
from jobs.specs.train import load_spec
from tests.conftest import DEMO, TINY

pytestmark = pytest.mark.ray

CHECKPOINT_EVERY = 4
KILL_AFTER_STEP = 5  # rank 1 dies once it has trained this step (after the checkpoint at step 4)
RUN2_STEPS = 8  # run 2 (1 worker) trains steps 4..7 and checkpoints at its end
BATCH = 4  # train.batch_size in TINY: sequences per worker per step
SEQ_LEN = 32
KILL_POLL_S = 0.05
REGISTER_TIMEOUT_S = 120  # for Ray Train to register the checkpoint at step 4 before the kill


class _SequenceLog:
    """The loop's batch observer (workers/loop.py, ``on_batch``): per step, this rank's sequences as
    (epoch, ids in the epoch, CRC-32 of each row's tokens), appended to
    <output folder>/sequence-ids/rank<r>-<pid>.jsonl, so the test can check that none is trained on
    twice or skipped."""

    def __init__(self, config: dict):
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()
        folder = Path(config["worker"]["control_dir"]) / "sequence-ids"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{self.rank}-{os.getpid()}.jsonl", "a")  # noqa: SIM115 (lives with the loop)

    def __call__(self, step: int, epoch: int, ids: list[int], rows) -> None:
        crcs = [zlib.crc32(r.numpy().tobytes()) for r in rows.cpu()]
        self.file.write(json.dumps({"step": step, "rank": self.rank, "epoch": epoch, "ids": ids,
                                    "crc": crcs}) + "\n")
        self.file.flush()


def _recording_loop(config: dict) -> None:
    """The product's loop, with this rank's sequence log as its batch observer."""
    from workers.loop import train_loop_per_worker

    train_loop_per_worker(config, on_batch=_SequenceLog(config))


def _killed_loop(config: dict) -> None:
    """Rank 1 exits abruptly right after it has trained KILL_AFTER_STEP, once Ray Train has registered
    the checkpoint before it: a result reported by the workers is registered when the controller next
    polls them, and a worker group that dies first loses it (the test would then resume from 0)."""
    from workers.loop import train_loop_per_worker

    out = Path(config["worker"]["control_dir"])
    log = _SequenceLog(config)

    def record_then_die(step: int, *args) -> None:
        log(step, *args)
        if log.rank == 1 and step == KILL_AFTER_STEP:
            snapshot = out / RUN_NAME / "checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while time.monotonic() < deadline and not (snapshot.exists() and "step-" in snapshot.read_text()):
                time.sleep(KILL_POLL_S)
            os._exit(1)  # as a crash or an OOM kill: no cleanup, no checkpoint

    train_loop_per_worker(config, on_batch=record_then_die)


def _unique_corpus(root: Path) -> Path:
    """Text whose packed sequences all differ (every line is unique), so a CRC names a sequence."""
    src = root / "corpus"
    src.mkdir()
    for f in range(8):
        (src / f"mod{f:02d}.py").write_text("".join(f"v_{f}_{i} = {f * 7919 + i * 104729}\n" for i in range(40)))
    return src


def _records(files: set[Path]) -> list[dict]:
    return [json.loads(line) for f in sorted(files) for line in f.read_text().splitlines()]


def test_worker_kill_then_resizes_2_1_3_apply_every_sequence_of_the_epoch_once(train_ray, tmp_path):
    from workers.checkpoint import load_tokenizer_for
    from workers.data import PrepareConfig, open_training_data, prepare
    from workers.data.order import Plan

    prepared = tmp_path / "prepared"
    prepare(PrepareConfig(source=str(_unique_corpus(tmp_path)), path=str(prepared), shard_bytes=4096,
                          row_group_bytes=1024, val_fraction=0.1), log=lambda _: None)
    sets = [*TINY, f"data.path={prepared}", f"data.seq_len={SEQ_LEN}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.log_every=4", "resources.max_failures=0"]
    spec = load_spec(DEMO, [*sets, f"train.steps={RUN2_STEPS + 4}"])
    data = open_training_data(spec.data, spec.model.vocab_size, log=lambda _: None)
    total = Plan(data.units["train"], SEQ_LEN).total
    # Run 3 (3 workers x BATCH a step) runs until one step into epoch 1.
    steps = RUN2_STEPS + (total - CHECKPOINT_EVERY * 2 * BATCH - (RUN2_STEPS - CHECKPOINT_EVERY) * BATCH) // (3 * BATCH) + 1
    out = tmp_path / "out"
    ids = out / "sequence-ids"

    with pytest.raises(Exception):  # noqa: B017 (Ray Train's own error type wraps the worker's death)
        build_trainer(spec, data, out, train_loop=_killed_loop).fit()
    first = set(ids.glob("*.jsonl"))
    build_trainer(load_spec(DEMO, [*sets, "resources.num_workers=1", f"train.steps={RUN2_STEPS}"]), data, out,
                  train_loop=_recording_loop).fit()
    second = set(ids.glob("*.jsonl")) - first
    result = build_trainer(load_spec(DEMO, [*sets, "resources.num_workers=3",
                                            f"train.steps={steps}"]), data, out, train_loop=_recording_loop).fit()
    run1, run2, run3 = _records(first), _records(second), _records(set(ids.glob("*.jsonl")) - first - second)

    assert {r["rank"] for r in run1} == {0, 1} and {r["rank"] for r in run2} == {0}
    assert {r["rank"] for r in run3} == {0, 1, 2}
    assert max(r["step"] for r in run1) >= KILL_AFTER_STEP  # the kill came mid-epoch, after a checkpoint
    assert sorted(r["step"] for r in run2) == list(range(CHECKPOINT_EVERY, RUN2_STEPS))
    assert sorted({r["step"] for r in run3}) == list(range(RUN2_STEPS, steps))
    kept = [r for r in run1 if r["step"] < CHECKPOINT_EVERY]
    lineage = kept + run2 + run3
    assert all(len(r["ids"]) == len(r["crc"]) == BATCH for r in lineage)

    # Epoch 0 in the surviving lineage: each sequence once, none skipped but the tail (< 1 global batch).
    epoch0 = [(i, crc) for r in lineage if r["epoch"] == 0 for i, crc in zip(r["ids"], r["crc"], strict=True)]
    seen = [i for i, _ in epoch0]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(total))
    assert total - len(seen) < 3 * BATCH
    assert len({crc for _, crc in epoch0}) == len(epoch0)  # distinct sequences, not only distinct ids
    assert any(r["epoch"] == 1 for r in run3)  # and the next epoch started
    # An id names one sequence wherever it is read: run 1's lost steps (retrained by run 2 from
    # other ranks' reads) carry the same tokens for the same id.
    named = dict(epoch0)
    lost = [(i, crc) for r in run1 if r["step"] >= CHECKPOINT_EVERY for i, crc in zip(r["ids"], r["crc"], strict=True)]
    assert lost and all(named[i] == crc for i, crc in lost if i in named)

    assert result.metrics["world_size"] == 3
    assert load_tokenizer_for(Path(result.checkpoint.path)).kind == "bytes"
