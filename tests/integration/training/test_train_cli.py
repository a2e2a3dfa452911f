"""`python -m jobs.train` without a cluster: bad input (a clear message and a non-zero exit, no
traceback, no Ray), the driver's progress display and its message for a failed worker."""

import io

import pytest
from rich.console import Console

from jobs.runtime.display import RunDisplay
from jobs.train import training_error
from orchestrator.controller.observe import latest_progress
from tests.conftest import DEMO, TINY, run_train
from workers.data import DataConfig, build_shards, shard_paths
from workers.progress import NOTE, PROGRESS, ProgressRecord

TINY_MODEL = [p for p in TINY if p.startswith("model.")]
REPORTS = [(PROGRESS, ProgressRecord(step=s, total_steps=300, loss=3.0 - s / 100, lr=0.003, tokens_per_s=15519.25,
                                     wire_bytes=1000 * s, dense_bytes=50_000 * s, compression=50.0, max_vio=0.1,
                                     drop_frac=0.01))
           for s in (110, 120)]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "compression.density=2"], "compression.density"),
        (["--set", "train.steps=abc"], "train.steps"),
        (["--set", "model.n_expertz=4"], "model.n_expertz"),
    ],
)
def test_invalid_spec_exits_2_naming_the_field(args, field):
    r = run_train("--spec", str(DEMO), *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert field in r.stderr and "Traceback" not in r.stderr
    assert "ray" not in r.stdout.lower()  # stopped before any Ray work


def test_unparsable_spec_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\n")
    r = run_train("--spec", str(bad), timeout=60)
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_folder_exits_1(tmp_path):
    r = run_train("--spec", str(DEMO), "--set", f"data.source={tmp_path}/nowhere", timeout=60)
    assert r.returncode == 1
    assert f"{tmp_path}/nowhere does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.ray
def test_corrupt_shard_exits_1_naming_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text(f"x{i} = {i}\n" * 400)
    data = DataConfig(source=str(src), path=str(tmp_path / "shards"), shard_tokens=2048)
    # Checked by the read task that reads it (nothing is scanned up front): every training shard is
    # truncated, so the shard the worker reads first stops the run, naming that file. No retries: each
    # would read a corrupt shard again (the retry path has its own tests). One worker, the tiny model:
    # a second worker or a bigger model would only add start-up.
    victims = shard_paths(build_shards(data, lambda _: None), "train")
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(100)
    r = run_train("--spec", str(DEMO), "--set", f"data.source={src}", "--set", f"data.path={tmp_path}/shards",
                  "--set", "data.shard_tokens=2048", "--set", "resources.max_failures=0",
                  "--set", "resources.num_workers=1", *(a for p in TINY_MODEL for a in ("--set", p)), timeout=300)
    assert r.returncode == 1
    assert any(f"shard {v} is corrupt" in r.stderr for v in victims) and "Traceback" not in r.stderr


def test_plain_display_prints_lines_the_control_plane_parses():
    out = io.StringIO()
    with RunDisplay(300, live=False, console=Console(file=out)) as display:
        for event in [(NOTE, "resuming from step 100 (saved by 2 workers, EP 1; now 2 workers, EP 1)"), *REPORTS]:
            display.handle(event)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resuming from step 100") and len(lines) == 3
    assert all(line.startswith("[progress] step=") for line in lines[1:])
    latest = latest_progress(out.getvalue())  # what the controller reads from the job's log
    assert latest["step"] == 120 and latest["total_steps"] == 300 and latest["loss"] == pytest.approx(1.8)
    assert latest["wire_bytes"] == 120_000 and latest["compression"] == 50
    parsed = ProgressRecord.from_line(lines[-1]).model_dump()  # the line carries the whole record (4 digits)
    assert parsed == pytest.approx(REPORTS[-1][1].model_dump(), rel=1e-3)


def test_live_display_redraws_one_bar_and_prints_notes_above_it():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with RunDisplay(300, live=True, console=console) as display:
        for event in [(NOTE, "resuming from step 100"), *REPORTS]:
            display.handle(event)
    text = out.getvalue()
    assert "[progress]" not in text
    assert text.count("\n") == 2  # the note's line and the bar's last frame; every other frame is redrawn
    last = text.rsplit("\r", 1)[-1]
    assert "120/300" in last and "loss 1.800" in last and "15,519 tok/s" in last and "50.0x fewer bytes" in last
    assert "ETA -:--:--" not in last  # a rate once two reports are in
    assert "resuming from step 100\n" in text


def test_worker_failure_message_names_each_cause_once():
    from ray.train import WorkerGroupError

    cause = RuntimeError("the training data yields no batch of 65536 sequences per worker")
    e = WorkerGroupError("[Rank 0,1 Error Snippet]:\nTraceback (most recent call last): ...", {0: cause, 1: cause})
    message = training_error(e, verbose=False)
    assert message.splitlines()[0] == f"error: training failed on worker 0,1: RuntimeError: {cause}"
    assert "Traceback" not in message and "--verbose" in message
    assert "Traceback" in training_error(e, verbose=True)  # Ray's text with the workers' tracebacks
    assert training_error(ValueError("bad"), verbose=False) == "error: training failed: ValueError: bad"
