"""Checkpoints under a team's data roots (issue #20, point 2): a ``step-*`` folder, ``model.pt`` or
``meta.json`` that links to another team's files is refused naming the file, when serving resolves
or loads it and when training resumes from it; a ``checkpoint_storage`` holding a link that leads
outside the roots refuses the run before Ray Train writes anything. Without ORCH_DATA_ROOTS (an
admin's job, a hand run) the same folders load as before. Real files, real links, no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.runtime.trainer import RUN_NAME, TRAIN_SNAPSHOT_FILE, check_storage
from jobs.specs.base import SpecError
from jobs.specs.serve import resolve_checkpoint
from tests.bench.serving import write_checkpoint
from workers.checkpoint import (
    TOKENIZER_FILE,
    load_model,
    load_model_and_optimizer,
    load_tokenizer_for,
    read_meta,
)
from workers.config import ModelConfig
from workers.confine import ROOTS_ENV, OutsideRoots, env_value
from workers.data.tokenizer import ByteTokenizer
from workers.moe.model import MoETransformer

ROOT = Path(__file__).resolve().parents[3]
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, expert_hidden=16, max_seq_len=32)


@pytest.fixture
def teams(tmp_path: Path) -> tuple[Path, Path]:
    """Two teams' roots side by side: ``mine`` (the job's) and ``theirs`` (holding a checkpoint)."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    ckpt = write_checkpoint(theirs / "run" / RUN_NAME / "step-00000005", TINY, seed=3)
    (ckpt / TOKENIZER_FILE).write_text(ByteTokenizer().to_json())
    return mine, theirs


def confine_to(monkeypatch: pytest.MonkeyPatch, *roots: Path) -> None:
    monkeypatch.setenv(ROOTS_ENV, env_value(str(r) for r in roots))


def test_a_step_folder_linking_outside_is_refused_naming_it(teams, monkeypatch):
    mine, theirs = teams
    write_checkpoint(mine / "run" / RUN_NAME / "step-00000002", TINY, seed=0)
    planted = mine / "run" / RUN_NAME / "step-00000009"  # the newest: what serving would pick
    planted.symlink_to(theirs / "run" / RUN_NAME / "step-00000005")
    # Unconfined (before this issue, and for admins): the link is served.
    assert resolve_checkpoint(mine / "run") == theirs / "run" / RUN_NAME / "step-00000005"
    assert load_model(planted).config == TINY
    confine_to(monkeypatch, mine)
    with pytest.raises(SpecError, match=r"checkpoint: .*step-00000009 resolves to .*theirs.*outside the team's"):
        resolve_checkpoint(mine / "run")
    for load in (read_meta, load_model):
        with pytest.raises(OutsideRoots, match="step-00000009/meta.json resolves to"):
            load(planted)
    with pytest.raises(OutsideRoots, match="step-00000009/tokenizer.json resolves to"):
        load_tokenizer_for(planted)


def test_a_model_file_linking_outside_is_refused_when_loaded_and_resumed(teams, monkeypatch):
    mine, theirs = teams
    ckpt = write_checkpoint(mine / "ckpt", TINY, seed=0)
    (ckpt / "model.pt").unlink()
    (ckpt / "model.pt").symlink_to(theirs / "run" / RUN_NAME / "step-00000005" / "model.pt")
    theirs_state = torch.load(theirs / "run" / RUN_NAME / "step-00000005" / "model.pt", weights_only=True)
    assert torch.equal(load_model(ckpt).tok_emb.weight, theirs_state["tok_emb.weight"])  # unconfined: read through
    confine_to(monkeypatch, mine)
    assert resolve_checkpoint(ckpt) == ckpt  # meta.json is the team's own: the folder resolves
    with pytest.raises(OutsideRoots, match=r"ckpt/model.pt resolves to .*theirs"):
        load_model(ckpt)
    model = MoETransformer(TINY)
    before = model.tok_emb.weight.detach().clone()
    with pytest.raises(OutsideRoots, match=r"ckpt/model.pt resolves to .*theirs"):  # a training resume
        load_model_and_optimizer(ckpt, model=model, optimizer=torch.optim.AdamW(model.parameters()), groups=None,
                                 device=torch.device("cpu"))
    assert torch.equal(model.tok_emb.weight, before)  # nothing of theirs reached the model


def test_checkpoints_inside_the_roots_load_confined(teams, monkeypatch):
    """A link that stays inside the roots (a team's own `latest` link, say) is followed."""
    mine, theirs = teams
    ckpt = write_checkpoint(mine / "run" / RUN_NAME / "step-00000004", TINY, seed=0)
    (mine / "latest").symlink_to(ckpt)
    confine_to(monkeypatch, mine, theirs / "nothing-here")
    assert resolve_checkpoint(mine / "latest") == ckpt and resolve_checkpoint(mine / "run") == ckpt
    assert load_model(mine / "latest").config == TINY
    assert load_tokenizer_for(mine / "latest").kind == "bytes"


def test_a_download_folder_is_allowed_only_when_the_reader_names_it(teams, monkeypatch):
    """An s3:// checkpoint is read from a temporary copy the reader made: it passes it as ``also``."""
    mine, theirs = teams
    copy = theirs / "run" / RUN_NAME / "step-00000005"  # stands for the temporary copy, outside the roots
    confine_to(monkeypatch, mine)
    with pytest.raises(OutsideRoots):
        load_model(copy)
    assert load_model(copy, also=(copy,)).config == TINY


# -- writing: Ray Train's storage ------------------------------------------------------------------


def test_storage_that_is_or_holds_a_link_outside_is_refused(teams, monkeypatch, tmp_path):
    mine, theirs = teams
    out = tmp_path / "job" / "out"
    check_storage(str(mine / "ckpts"), out)  # unconfined: nothing to check
    confine_to(monkeypatch, mine, tmp_path / "job")
    check_storage(str(mine / "ckpts"), out)  # not there yet: Train creates it
    check_storage(None, out)  # the job's own folder
    (mine / "to-theirs").symlink_to(theirs / "run")
    with pytest.raises(OutsideRoots, match=r"checkpoint_storage .*to-theirs resolves to .*theirs/run"):
        check_storage(str(mine / "to-theirs"), out)
    run = mine / "ckpts" / RUN_NAME
    run.mkdir(parents=True)
    (run / "step-00000001").symlink_to(theirs / "run" / RUN_NAME / "step-00000005")
    with pytest.raises(OutsideRoots, match=r"link .*ckpts/ray-train/step-00000001 resolves to"):
        check_storage(str(mine / "ckpts"), out)
    (run / "step-00000001").unlink()
    write_checkpoint(run / "step-00000001", TINY, seed=0)
    (run / "step-00000001" / "optim.pt").symlink_to(theirs / "secret.pt")  # a link deep inside
    with pytest.raises(OutsideRoots, match=r"step-00000001/optim.pt resolves to"):
        check_storage(str(mine / "ckpts"), out)
    (run / "step-00000001" / "optim.pt").unlink()
    (run / "step-00000001" / "again").symlink_to(run / "step-00000001")  # inside: allowed
    check_storage(str(mine / "ckpts"), out)
    out.mkdir(parents=True)
    (out / RUN_NAME).symlink_to(theirs / "run" / RUN_NAME)  # the job's out folder holds a planted run folder
    with pytest.raises(OutsideRoots, match=r"checkpoint folder .*out/ray-train resolves to"):
        check_storage(None, out)


@pytest.mark.parametrize("name", ["../../theirs/run/ray-train/step-00000005", "/etc"])
def test_a_snapshot_naming_a_checkpoint_outside_its_run_folder_is_refused(teams, monkeypatch, name):
    """Ray Train resumes from, and prunes (deletes), the checkpoints its snapshot names by a path
    relative to the run folder."""
    mine, _ = teams
    run = mine / "ckpts" / RUN_NAME
    run.mkdir(parents=True)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step-00000001", "metrics": {}},
                                       {"checkpoint_dir_name": name, "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "step-00000001", "metrics": {}},
                "validated_checkpoint_dir_names": []}
    (run / TRAIN_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    confine_to(monkeypatch, mine)
    with pytest.raises(OutsideRoots, match=f"names checkpoint '{name}' outside its run folder"):
        check_storage(str(mine / "ckpts"), mine / "out")
    snapshot["checkpoint_results"].pop()
    (run / TRAIN_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    check_storage(str(mine / "ckpts"), mine / "out")


def test_jobs_train_refuses_a_planted_storage_link_before_writing_anything(teams, tmp_path):
    """`python -m jobs.train` as the controller runs it for a team: exit 1 naming the link, before
    Ray starts and before anything is written through the link (their folder is byte-for-byte as it was)."""
    mine, theirs = teams
    storage = mine / "ckpts"
    (storage / RUN_NAME).mkdir(parents=True)
    (storage / RUN_NAME / "step-00000001").symlink_to(theirs / "run" / RUN_NAME / "step-00000005")
    before = {p: p.read_bytes() for p in sorted(theirs.rglob("*")) if p.is_file()}
    job = tmp_path / "job"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, ROOTS_ENV: env_value([str(mine), str(job)])}
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--spec", str(ROOT / "jobs/examples/demo.yaml"),
                        "--set", f"checkpoint_storage={storage}", "--out", str(job / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"link {storage}/{RUN_NAME}/step-00000001 resolves to" in r.stderr and "Traceback" not in r.stderr
    assert "ray:" not in r.stdout and not (job / "out").exists()  # refused before Ray and before any write
    assert {p: p.read_bytes() for p in sorted(theirs.rglob("*")) if p.is_file()} == before
