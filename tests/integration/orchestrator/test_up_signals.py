"""`orch up` with its real local Ray head, stopped the way service managers stop it.

The head runs in its own session (``ray start --head --block`` with start_new_session), so a signal to
`orch up` never reaches it: unless `orch up` stops it, a SIGTERM (systemd, Docker, Kubernetes) or a
SIGHUP would leave a whole Ray cluster running (SIGINT, from a terminal, is checked alongside). Each
test finds the head's session by its command line (``--temp-dir <state dir>/ray``) and checks that no
process of that session outlives `orch up`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.servers import free_port, wait_until_healthy

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]
TOKEN = "up-signals-token-0123456789abcdef"
# The head's start on 2 busy cores: Ray's own start plus its Jobs API (LocalRayHead waits up to 180 s).
UP_HEALTHY_TIMEOUT_S = 240.0
# The API's graceful shutdown, then the head's drain (~6 s idle; LocalRayHead kills it after 60 s).
UP_EXIT_TIMEOUT_S = 90.0
SESSION_GONE_TIMEOUT_S = 30.0


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every process that can be read now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            cmdline = argv.replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # it ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z":
            found[int(entry)] = (int(fields[3]), cmdline)
    return found


def _head_session(ray_dir: Path) -> int | None:
    """The session of the `ray start --head` that uses ``ray_dir``: its pid, as it leads its session.
    Ray's processes stay in it (workers take their own process group, not their own session)."""
    for pid, (sid, cmdline) in _processes().items():
        if " start --head " in cmdline and f" --temp-dir {ray_dir} " in f"{cmdline} ":
            return sid if sid == pid else None
    return None


def _session_members(sid: int) -> dict[int, str]:
    return {pid: cmd for pid, (s, cmd) in _processes().items() if s == sid}


def _kill_session(sid: int) -> None:
    for pid in _session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_up_stopped_by_a_signal_stops_its_ray_head(signum):
    # Short on purpose: a state dir under 40 characters keeps the head's temp dir at <state>/ray.
    state_dir = Path(tempfile.mkdtemp(prefix="orch-up-", dir="/tmp"))
    ray_dir = state_dir / "ray"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_API_TOKEN=TOKEN, ORCH_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO))
    log_path = state_dir / "up.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it
    # Its own session too, so the cleanup below can kill `orch up` and whatever it started.
    argv = [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), "--num-cpus", "1"]
    proc = subprocess.Popen(argv,
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    sid = None
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", log_path.read_text,
                           timeout_s=UP_HEALTHY_TIMEOUT_S)
        sid = _head_session(ray_dir)
        assert sid is not None, f"no `ray start --head --temp-dir {ray_dir}` leading its own session"
        members = _session_members(sid)
        assert any("gcs_server" in cmd for cmd in members.values()), members
        assert any("raylet" in cmd for cmd in members.values()), members

        proc.send_signal(signum)
        code = proc.wait(UP_EXIT_TIMEOUT_S)
        output = log_path.read_text()
        assert code == -signum, f"exit {code}: {output[-2000:]}"
        assert "stopping the local Ray head" in output

        deadline = time.monotonic() + SESSION_GONE_TIMEOUT_S
        while (left := _session_members(sid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray head processes outlived `orch up`: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        sid = sid or _head_session(ray_dir)  # a test that failed early may have left a head
        if sid is not None:
            _kill_session(sid)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_ctrl_c_through_a_pipe_still_stops_the_head():
    """``orch up --local 2>&1 | tee up.log`` and Ctrl-C: the terminal's SIGINT reaches the whole
    pipeline, so ``tee`` dies with `orch up` and every later write to stderr fails. The head must
    stop all the same (it did not when the "stopping" line's write raised BrokenPipeError)."""
    state_dir = Path(tempfile.mkdtemp(prefix="orch-up-", dir="/tmp"))
    ray_dir, log_path, port = state_dir / "ray", state_dir / "up.log", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_API_TOKEN=TOKEN, ORCH_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), "--num-cpus", "1"]
    pipeline = f"{shlex.join(argv)} 2>&1 | tee {shlex.quote(str(log_path))} >/dev/null"
    # Its own session and process group: the group is what a terminal's Ctrl-C signals.
    proc = subprocess.Popen(["/bin/sh", "-c", pipeline], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    sid = None
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", log_path.read_text, timeout_s=UP_HEALTHY_TIMEOUT_S)
        sid = _head_session(ray_dir)
        assert sid is not None, f"no `ray start --head --temp-dir {ray_dir}` leading its own session"
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + UP_EXIT_TIMEOUT_S + SESSION_GONE_TIMEOUT_S
        while (_session_members(proc.pid) or _session_members(sid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_members(proc.pid), f"`orch up` outlived Ctrl-C: {sorted(_session_members(proc.pid))}"
        assert not _session_members(sid), f"{len(_session_members(sid))} Ray head processes outlived `orch up`"
    finally:
        for group in (proc.pid, sid):
            if group is not None:
                _kill_session(group)
        proc.wait(30)
        shutil.rmtree(state_dir, ignore_errors=True)
