"""Bad input to `python -m jobs.train`: a clear message and a non-zero exit, no traceback, no Ray."""

import pytest

from tests.conftest import DEMO, run_train
from workers.data import DataConfig, build_shards, shard_paths


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


def test_corrupt_shard_exits_1_naming_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text(f"x{i} = {i}\n" * 400)
    data = DataConfig(source=str(src), path=str(tmp_path / "shards"), shard_tokens=2048)
    victim = shard_paths(build_shards(data, lambda _: None), "train")[0]
    with open(victim, "r+b") as f:
        f.truncate(100)
    r = run_train("--spec", str(DEMO), "--set", f"data.source={src}", "--set", f"data.path={tmp_path}/shards",
                  "--set", "data.shard_tokens=2048", timeout=60)
    assert r.returncode == 1
    assert f"shard {victim} is corrupt" in r.stderr and "Traceback" not in r.stderr
