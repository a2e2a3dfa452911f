"""`orch up`: the API in the foreground, with a local Ray head first unless RAY_ADDRESS names a cluster.

SIGINT, SIGTERM and SIGHUP stop both. The head runs in its own session, so no signal sent to `orch up`
reaches it: each stop signal is turned into an exception in the main thread, whose ``finally`` stops the
head; then `orch up` dies of that signal, as its sender expects.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from orchestrator.cli.core import EXIT_USAGE, CliError, app

if TYPE_CHECKING:
    from orchestrator.local.autoscale import FakeNodes

# Service managers stop with SIGTERM (systemd, Docker, Kubernetes), a terminal with SIGINT, a closed
# terminal or session with SIGHUP.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopSignal(BaseException):
    """A stop signal, raised in `orch up`'s main thread so its ``finally`` stops the local Ray head.
    The head runs in its own session, so no signal sent to `orch up` reaches it: a process killed by
    a signal's default action would leave it running."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # While uvicorn serves, SIGINT and SIGTERM go to its own handlers: it shuts the API down gracefully,
    # puts this handler back and raises the signal again. A SIGHUP takes the same path.
    on_term = signal.getsignal(signal.SIGTERM)
    if signum == signal.SIGHUP and callable(on_term) and on_term is not _on_stop_signal:
        on_term(signum, frame)
        return
    raise _StopSignal(signum)


def _say(message: str) -> None:
    """A line on stderr, which may be a pipe whose reader is gone: ``orch up 2>&1 | tee up.log``
    stopped with Ctrl-C, where the terminal's SIGINT ended ``tee`` too. Stopping the head must not
    depend on it (a failed write would skip the ``finally`` that stops the head)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def _die_of(signum: int) -> None:
    """Ends this process by ``signum``'s default action, so whoever sent it sees that it worked (Python
    does the same after an uncaught KeyboardInterrupt); systemd counts that as a clean stop."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a pipe whose reader is gone (_say)
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


@app.command(rich_help_panel="Service", help="start the API (and a local Ray head unless RAY_ADDRESS is set); "
                  "SIGINT, SIGTERM or SIGHUP stop both")
def up(
    port: Annotated[int | None, typer.Option(help="API port (default 8080, ORCH_PORT)")] = None,
    local: Annotated[bool, typer.Option("--local", help="local mode: make an API token if none is set")] = False,
    num_cpus: Annotated[int | None, typer.Option(
        help="logical CPUs the local Ray head offers (default: the cores + 2, room for Ray Data's read tasks "
             "beside the training workers)")] = None,
    autoscale: Annotated[bool, typer.Option(
        "--autoscale", help="the local head runs Ray's autoscaler with fake nodes (real raylets on this machine): "
                            "queued jobs make nodes start, idle ones stop")] = False,
    autoscale_config: Annotated[Path | None, typer.Option(
        metavar="FILE", help="with --autoscale: YAML of the fake node types (workers: [{name, cpus, min_workers, "
                             "max_workers, labels}], idle_timeout_minutes, upscaling_speed); default: 0-2 nodes "
                             "of 1 CPU")] = None,
) -> None:
    import secrets

    from orchestrator.settings import SettingsError, load_settings, write_secret

    fake_nodes = _fake_nodes(autoscale, autoscale_config)
    overrides: dict[str, Any] = {"port": port} if port else {}
    if local:
        overrides["local"] = True
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        raise CliError(f"refusing to start: {e}", EXIT_USAGE) from None
    settings.token  # noqa: B018 - local mode: made (or read) now, so the CLI on this machine finds it
    previous_handlers = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    head = None
    stopped_by: int | None = None
    try:
        if not settings.ray_address:
            from orchestrator.local.head import LocalRayHead, default_head_cpus

            ray_token = secrets.token_hex(32)
            token_file = settings.state_dir / "ray_auth_token"
            write_secret(token_file, ray_token)
            head = LocalRayHead(settings.state_dir / "ray", num_cpus=num_cpus or default_head_cpus(),
                                auth_token=ray_token, fake_nodes=fake_nodes)
            print(f"starting a local Ray head with {head.num_cpus} logical CPUs (logs: {head.log_path}) ...",
                  file=sys.stderr)
            head.start()
            if fake_nodes is not None:  # queued jobs' demand goes to the autoscaler (orchestrator/controller/demand_groups.py)
                overrides.update(ray_gcs_address=head.gcs_address, autoscaler_max_extra=fake_nodes.max_extra())
            settings = load_settings(**overrides, ray_address=head.dashboard_url, ray_auth_token=ray_token,
                                     ray_logs_dir=head.temp_dir / "session_latest" / "logs")
            print(f"Ray dashboard {head.dashboard_url}, token auth on; for `ray job submit` against it: "
                  f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {token_file}) RAY_ADDRESS={head.dashboard_url}",
                  file=sys.stderr)
        from orchestrator.api.app import create_app
        from orchestrator.api.server import serve

        url = f"http://{settings.host}:{settings.port}"
        where = f"token in {settings.state_dir / 'api_token'}" if settings.api_token is None else "token from ORCH_API_TOKEN"
        print(f"orch API on {url} ({where}); Ray at {settings.ray_address}", file=sys.stderr)
        serve(create_app(settings), settings.host, settings.port)
    except _StopSignal as e:
        stopped_by = e.signum
    finally:
        # A repeated signal must not cut the head's stop short (it is bounded: drain, then SIGKILL).
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            if head is not None:
                _say("stopping the local Ray head ...")
                head.stop()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
    if stopped_by is not None:
        _die_of(stopped_by)
        raise typer.Exit(128 + stopped_by)  # the shell's convention, should the signal's action not end us


def _fake_nodes(autoscale: bool, config: Path | None) -> FakeNodes | None:
    """The fake node types for --autoscale (from FILE, or the defaults); None without --autoscale."""
    from pydantic import ValidationError

    from jobs.specs.base import field_errors
    from orchestrator.local.autoscale import FakeNodes

    if not autoscale:
        if config is not None:
            raise CliError("--autoscale-config needs --autoscale", EXIT_USAGE)
        return None
    if os.environ.get("RAY_ADDRESS") or os.environ.get("ORCH_RAY_ADDRESS"):
        raise CliError("--autoscale starts a local head; unset RAY_ADDRESS", EXIT_USAGE)
    try:
        return FakeNodes.model_validate(yaml.safe_load(config.read_text()) or {}) if config else FakeNodes()
    except OSError as e:
        raise CliError(f"cannot read {config}: {e.strerror}", EXIT_USAGE) from None
    except yaml.YAMLError as e:
        raise CliError(f"{config} is not valid YAML: {e}", EXIT_USAGE) from None
    except ValidationError as e:
        raise CliError(f"{config}: " + "; ".join(field_errors(e.errors())), EXIT_USAGE) from None
