"""Settings fail closed: no token, a short token or a default one refuse to serve outside local mode."""

from __future__ import annotations

import stat

import pytest

from orchestrator.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("ORCH_API_TOKEN", "ORCH_LOCAL", "ORCH_DB_URL", "RAY_ADDRESS", "ORCH_RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path))


@pytest.mark.parametrize("token", [None, "short", "changethis", "CHANGEME", "password"])
def test_refuses_missing_or_weak_tokens(monkeypatch, token):
    if token is not None:
        monkeypatch.setenv("ORCH_API_TOKEN", token)
    with pytest.raises(SettingsError, match="ORCH_API_TOKEN"):
        load_settings()


def test_local_mode_makes_a_private_token_once(tmp_path):
    s = load_settings(local=True)
    token = s.token
    path = tmp_path / "api_token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(local=True).token == token  # the CLI and a restart find the same one


def test_defaults_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCH_API_TOKEN", "x" * 20)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.setenv("ORCH_DRIVER_RESOURCES", '{"head": 0.01}')
    s = load_settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'orch.db'}" and s.job_root == tmp_path / "jobs"
    assert s.ray_address == "http://127.0.0.1:8265" and s.driver_resources == {"head": 0.01}
    assert s.host == "127.0.0.1"
    monkeypatch.setenv("ORCH_DB_URL", "postgresql+psycopg://orch@db/orch")
    assert load_settings().database_url == "postgresql+psycopg://orch@db/orch"


@pytest.mark.parametrize(("var", "value"), [("ORCH_JOB_PYTHON", "python; rm -rf /"), ("ORCH_PORT", "0"),
                                            ("ORCH_MAX_BODY_BYTES", "10"), ("ORCH_SQLITE_SYNCHRONOUS", "OFF")])
def test_bad_values_are_refused(monkeypatch, var, value):
    monkeypatch.setenv("ORCH_API_TOKEN", "x" * 20)
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError):
        load_settings()
