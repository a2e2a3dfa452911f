"""A local Ray head for `orch up` and the integration tests: ``ray start --head --block`` as a child.

The head runs in its own session with its own temp dir and free ports, so it never touches another
Ray cluster on the machine (``ray stop`` would kill every cluster of the user; we never call it). It
stops on SIGTERM (Ray drains, then ends its processes); the process group is killed if that hangs.

Autoscaling: with ``fake_nodes`` the head runs Ray's autoscaler v1 with the fake multi-node provider
(orchestrator/local/autoscale.py): nodes it adds are real raylets on this machine in the head's temp dir.
They are not children of ``ray start`` once the monitor that made them is gone, so ``stop`` ends
every process left whose command line names this head's temp dir (ours alone: made by mkdtemp).

Token auth: with ``auth_token`` the head runs with ``RAY_AUTH_MODE=token``; the dashboard (Jobs API)
then wants ``Authorization: Bearer <token>``, and job drivers inherit the token from the head.
``python`` on the head's PATH is this interpreter (its folder goes first, as in an activated venv),
so the entrypoint ``python -m jobs.train`` runs with this environment's packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from jobs.kinds.train import DATA_HEADROOM_CPUS
from orchestrator.local.autoscale import FakeNodes, local_gcs_address, write_autoscaler_config
from workers.waiting import wait_until

HEAD_START_TIMEOUT_S = 180.0
HEAD_READY_POLL_S = 0.5
HEAD_STOP_TIMEOUT_S = 60.0
# How often the fake cluster's autoscaler looks at demand (Ray's default is 5 s).
AUTOSCALER_UPDATE_INTERVAL_S = 1
# Ray puts unix sockets under <temp_dir>/session_<timestamp>_<pid>/sockets/...; AF_UNIX paths end at 107
# bytes, so a longer temp dir is swapped for a short one under /tmp.
MAX_TEMP_DIR_CHARS = 40


def default_head_cpus() -> int:
    """The local head's logical CPUs: the cores plus room for Ray Data's tasks beside training workers
    that take one each (as jobs.train's embedded cluster has); the OS shares the real cores between
    the workers and the light read tasks."""
    return (os.cpu_count() or 1) + DATA_HEADROOM_CPUS


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host`` (the OS picks it); the head's ports, so it never meets another cluster's."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray_binary() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is not installed in this environment")
    return found


class LocalRayHead:
    def __init__(self, temp_dir: Path | None = None, num_cpus: int | None = None, auth_token: str | None = None,
                 env: dict[str, str] | None = None, resources: dict[str, float] | None = None,
                 gcs_port: int | None = None, dashboard_port: int | None = None,
                 fake_nodes: FakeNodes | None = None):
        # A temp dir made here (none given, or too long) is removed by stop(); a given one keeps its logs.
        self._owns_temp_dir = temp_dir is None or len(str(temp_dir)) > MAX_TEMP_DIR_CHARS
        if self._owns_temp_dir:
            temp_dir = Path(tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp"))
        self.temp_dir = temp_dir
        self.num_cpus = num_cpus
        self.auth_token = auth_token
        self.extra_env = env or {}
        self.resources = resources
        # Fixed ports let a restarted head take the place of a dead one (same address, new cluster).
        self.gcs_port = gcs_port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        # Fixed defaults (Ray Client 10001, the dashboard agent's HTTP 52365) clash with any other
        # Ray cluster on the machine: an agent that cannot bind means "No available agent to submit job".
        self.client_port = free_port()
        self.agent_port = free_port()
        self.fake_nodes = fake_nodes
        self.proc: subprocess.Popen | None = None
        self.log_path = self.temp_dir / "ray-head.log"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """host:port of the GCS: what a Ray driver (``ray.init``) and the fake nodes connect to."""
        return local_gcs_address(self.gcs_port)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(var, None)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "token" if self.auth_token else "disabled"
        if self.auth_token:
            env["RAY_AUTH_TOKEN"] = self.auth_token
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = HEAD_START_TIMEOUT_S) -> str:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            _ray_binary(), "start", "--head", "--block", "--disable-usage-stats",
            "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard=true", "--temp-dir", str(self.temp_dir),
            "--ray-client-server-port", str(self.client_port), "--dashboard-agent-listen-port", str(self.agent_port),
        ]
        if self.num_cpus is not None:
            argv += ["--num-cpus", str(self.num_cpus)]
        if self.resources:
            import json

            argv += ["--resources", json.dumps(self.resources)]
        env = self._env()
        if self.fake_nodes is not None:
            config = self.fake_nodes.cluster(self.gcs_address, self.num_cpus or 0)
            argv += ["--autoscaling-config", str(write_autoscaler_config(config, self.temp_dir / "autoscaler.yaml"))]
            # The provider refuses to run without RAY_FAKE_CLUSTER; v2 fails with it (autoscale.py).
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=str(AUTOSCALER_UPDATE_INTERVAL_S))
            env.pop("RAY_enable_autoscaler_v2", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self._end(HEAD_STOP_TIMEOUT_S)  # the temp dir stays: its log says why
            raise
        return self.dashboard_url

    def _wait_ready(self, timeout_s: float) -> None:
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log_path}")
            try:
                return httpx.get(f"{self.dashboard_url}/api/jobs/", headers=self.auth_headers,
                                 timeout=5.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(serving, timeout_s=timeout_s, interval_s=HEAD_READY_POLL_S,
                   what=f"the Ray head to serve its Jobs API (see {self.log_path})")

    def stop(self, timeout_s: float = HEAD_STOP_TIMEOUT_S) -> None:
        self._end(timeout_s)
        self._kill_leftovers()
        if self._owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _end(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group(wait_s=10)  # draining hung

    def _kill_leftovers(self) -> None:
        """SIGKILL this user's processes whose command line names this head's temp dir (fake nodes'
        raylets and workers, whose monitor died before it could end them); no other cluster's."""
        mark = str(self.temp_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if entry.stat().st_uid != os.getuid() or mark not in (entry / "cmdline").read_bytes():
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue  # gone meanwhile, or not ours to read

    def kill(self) -> None:
        """A crash of the head node: SIGKILL its process group, no draining. Workers exit when their
        raylet dies, and each job driver is killed by its supervisor's watchdog."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._kill_group(wait_s=30)

    def _kill_group(self, wait_s: float) -> None:
        """SIGKILL the head's own process group (we made it with start_new_session), then reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(wait_s)

    def __enter__(self) -> LocalRayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
