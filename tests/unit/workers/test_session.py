"""LocalSession on its own (workers/session.py): a one-rank process group for the loop's collectives,
checkpoints kept in a run folder as Ray Train lays them out, and the resume point a restarted
process finds there. The whole trial in its Tune actor: tests/integration/sweeps/test_sweep_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from workers.session import LocalSession


def _write(folder: Path, step: int) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    (folder / "model.pt").write_bytes(b"weights %d" % step)
    return folder


def test_a_one_rank_group_serves_the_loops_collectives_and_goes_with_the_session(tmp_path):
    with LocalSession(tmp_path / "run", 2, lambda m, c: None) as session:
        assert dist.is_initialized() and dist.get_world_size() == 1 and session.rank == 0
        t = torch.tensor([3.0], dtype=torch.float64)
        dist.all_reduce(t)
        assert t.item() == 3.0
    assert not dist.is_initialized()


def test_reports_keep_the_newest_checkpoints_and_a_restart_resumes_from_the_newest(tmp_path):
    run, seen = tmp_path / "run", []
    with LocalSession(run, 2, lambda metrics, path: seen.append((metrics["step"], path))) as session:
        assert session.resume_point(None) is None
        for step in (10, 20, 30):
            with session.staging() as folder:
                session.report({"step": step}, _write(folder, step), f"step-{step:08d}")
            # Each report comes after its folder is complete in place.
            assert (seen[-1][1] / "model.pt").read_bytes() == b"weights %d" % step
    assert [p.name for p in session.checkpoints()] == ["step-00000020", "step-00000030"]
    assert [s for s, _ in seen] == [10, 20, 30] and not list(run.glob(".*"))  # no partial copy left

    (run / "step-00000040").mkdir()  # a copy that a crash cut short has no meta.json: not a checkpoint
    restarted = LocalSession(run, 2, lambda m, c: None)
    assert Path(restarted.resume_point(str(tmp_path / "elsewhere")).path).name == "step-00000030"


def test_a_staged_checkpoint_is_renamed_into_place_and_a_dead_ones_staging_is_cleared(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".partial-dead").mkdir()  # staged by a process killed before its report
    with LocalSession(run, 2, lambda m, c: None) as session:
        assert not (run / ".partial-dead").exists()
        with session.staging() as folder:
            (folder / "meta.json").write_text("{}")
            inode = (folder / "meta.json").stat().st_ino
            session.report({"step": 1}, folder, "step-00000001")
            assert not folder.exists()
    assert (run / "step-00000001" / "meta.json").stat().st_ino == inode  # the same file: written once
    assert not list(run.glob(".*"))


def test_without_checkpoints_of_its_own_it_starts_from_the_given_one(tmp_path):
    given = _write(tmp_path / "given", 5)
    assert Path(LocalSession(tmp_path / "run", 1, lambda m, c: None).resume_point(str(given)).path) == given


def test_every_report_carries_a_checkpoint_from_its_staging(tmp_path):
    with LocalSession(tmp_path / "run", 1, lambda m, c: None) as session:
        for folder in (None, _write(tmp_path / "elsewhere", 1)):
            with pytest.raises(ValueError):
                session.report({"step": 1}, folder, "step-00000001")
