"""Serving under a hostile caller or team, end to end (issue #20, points 2 and 7): a real local Ray
cluster, Ray Serve on a loopback port, tiny random-weight checkpoints. A body over the deployment's
limit is a 413 (declared or chunked) and an over-long prompt a 422, both after the key check; the
replicas get the deploying job's data roots (ORCH_DATA_ROOTS) and refuse a ``model.pt`` linking
outside them; ``python -m jobs.serve`` never prints a key it made, it writes it to a 0600 file.
About 90 s on 2 cores.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from jobs.runtime.serving import deploy
from jobs.serve import KEY_FILE
from jobs.specs.serve import ServeSpec
from tests.bench.serving import write_checkpoint
from workers.config import ModelConfig
from workers.confine import ROOTS_ENV, env_value
from workers.serving.config import AutoscalingSpec, LimitsConfig

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[3]
CONTEXT = 64
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, expert_hidden=16, max_seq_len=CONTEXT)
KEY = "key-limits-0123456789"
BODY_LIMIT = 4096  # bytes (limits.max_body_bytes)
TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(name: str, ckpt: Path) -> ServeSpec:
    return ServeSpec(name=name, checkpoint=str(ckpt), num_cpus=0, autoscaling=AutoscalingSpec(),
                     limits=LimitsConfig(max_tokens=16, default_max_tokens=8, max_body_bytes=BODY_LIMIT))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(tmp, port, base URL): one deployment of a team's checkpoint, deployed under its roots."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop(ROOTS_ENV, None)
    tmp = tmp_path_factory.mktemp("limits")
    ckpt = write_checkpoint(tmp / "mine" / "ckpt", TINY, seed=0)
    write_checkpoint(tmp / "theirs" / "ckpt", TINY, seed=1)
    # Set after ray.init: Ray's worker processes would otherwise inherit it from this process.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = _free_port()
    try:
        os.environ[ROOTS_ENV] = env_value([str(tmp / "mine")])
        try:
            base = deploy(_spec("limits", ckpt), KEY, http_port=port).base_url  # confined: its own files load
        finally:
            del os.environ[ROOTS_ENV]
        yield tmp, port, base
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(base: str, key: str | None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/completions", headers={**headers, **kwargs.pop("headers", {})}, timeout=TIMEOUT_S,
                      **kwargs)


def test_a_body_over_the_limit_is_413_declared_or_chunked(served):
    _, _, base = served
    big = b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}'
    r = _post(base, KEY, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"limit of {BODY_LIMIT} bytes (limits.max_body_bytes)" in r.json()["detail"]

    def chunks():  # no Content-Length: read until it passes the limit
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = _post(base, KEY, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert _post(base, None, content=big).status_code == 401  # no key: nothing more is said
    r = _post(base, KEY, json={"prompt": "hi", "max_tokens": 2})  # under the limit: served
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


def test_an_over_long_prompt_is_422_naming_it(served):
    _, _, base = served
    r = _post(base, KEY, json={"prompt": ["ok", "y" * 2000]})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "prompt", 1] and "2000 characters cannot fit" in error["msg"]


def test_replicas_get_the_roots_and_refuse_a_model_file_linking_outside(served, monkeypatch):
    """meta.json is the team's own (the deploying driver reads it), model.pt links to another
    team's: the replica, which alone opens model.pt, refuses it; so the roots reached it."""
    tmp, port, _ = served
    ckpt = write_checkpoint(tmp / "mine" / "planted", TINY, seed=2)
    (ckpt / "model.pt").unlink()
    (ckpt / "model.pt").symlink_to(tmp / "theirs" / "ckpt" / "model.pt")
    monkeypatch.setenv(ROOTS_ENV, env_value([str(tmp / "mine")]))
    try:
        with pytest.raises(RuntimeError, match=r"OutsideRoots: file .*planted/model.pt resolves to .*theirs/ckpt"):
            deploy(_spec("planted", ckpt), KEY, http_port=port)  # the replica's own error, not only Serve's
    finally:
        serve.delete("planted")


def test_jobs_serve_writes_a_key_it_made_to_a_private_file_and_never_prints_it(served):
    tmp, port, _ = served
    spec = tmp / "keyed.yaml"
    spec.write_text(f"name: keyed\ncheckpoint: {tmp / 'mine' / 'ckpt'}\nnum_cpus: 0\nroute_prefix: /k\n"
                    "limits: {max_tokens: 16}\n")
    out = tmp / "keyed-out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ROOTS_ENV, "MOE_SERVE_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "jobs.serve", "--spec", str(spec), "--out", str(out),
                           "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    try:
        assert proc.returncode == 0, proc.stderr
        key_file = out / KEY_FILE
        key = key_file.read_text().strip()
        assert len(key) >= 40 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key not in proc.stdout + proc.stderr
        assert f"API key: made here, in {key_file.resolve()}" in proc.stdout
        base = f"http://127.0.0.1:{port}/k/v1"
        assert httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S).json()[
            "data"][0]["id"] == "keyed"
    finally:
        serve.delete("keyed")
