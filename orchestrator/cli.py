"""`orch`: start the service, submit and watch jobs. Readable tables by default, ``--json`` for scripts.

    orch up [--port 8080] [--local]        local Ray head (unless RAY_ADDRESS) + the API on 127.0.0.1;
                                           SIGINT, SIGTERM or SIGHUP stop both
    orch submit SPEC [--set k=v] [--follow] validate locally, POST /v1/jobs
    orch list | status ID | logs ID [-f] | cancel ID | cluster

The client reads ORCH_URL (default http://127.0.0.1:8080) and ORCH_API_TOKEN, or in local mode the
token file ``<ORCH_STATE_DIR>/api_token`` that `orch up --local` wrote.
Exit codes: 0 ok, 1 the job failed or the API said no, 2 bad arguments or an invalid spec.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
REQUEST_TIMEOUT_S = 30.0
STATES = ("PENDING", "QUEUED", "STARTING", "RUNNING", "RETRYING", "SUCCEEDED", "FAILED", "CANCELLED")


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# -- client side -----------------------------------------------------------------------------------


def _token() -> str:
    if os.environ.get("ORCH_API_TOKEN"):
        return os.environ["ORCH_API_TOKEN"]
    from orchestrator.settings import SettingsError, local_token

    state_dir = Path(os.environ.get("ORCH_STATE_DIR", Path.home() / ".orch")).expanduser()
    try:
        return local_token(state_dir, create=False)
    except SettingsError as e:
        raise CliError(str(e), 2) from None


def _client(args: argparse.Namespace) -> httpx.Client:
    return httpx.Client(base_url=args.url, timeout=REQUEST_TIMEOUT_S,
                        headers={"Authorization": f"Bearer {_token()}"})


def _check(r: httpx.Response) -> Any:
    if r.is_success:
        return r.json()
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        detail = "\n  ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    raise CliError(f"{r.request.method} {r.request.url.path}: {r.status_code} {detail}", 2 if r.status_code == 422 else 1)


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_job(job: dict[str, Any]) -> None:
    m = job.get("metrics") or {}
    print(table([
        ["id", job["id"]], ["name", job["name"]], ["state", job["state"]], ["message", job["message"]],
        ["attempts", f"{job['attempts']} (max retries {job['max_retries']})"],
        ["ray submission", job["ray_submission_id"]],
        ["cancel requested", "yes" if job["cancel_requested"] else "no"], ["created", _age(job["created_at"]) + " ago"],
    ], ["FIELD", "VALUE"]))
    if job.get("history"):
        print("\nhistory")
        print(table([[time.strftime("%H:%M:%S", time.localtime(e["at"])), e["from_state"], e["to_state"], e["reason"]]
                     for e in job["history"]], ["AT", "FROM", "TO", "REASON"]))
    if job.get("attempt_history"):
        print("\nattempts")
        print(table([[a["number"], a["ray_submission_id"], a["ray_status"], a["exit_code"]]
                     for a in job["attempt_history"]], ["N", "RAY SUBMISSION ID", "RAY STATUS", "EXIT"]))
    if m:
        print("\nmetrics")
        print(table([[k, _fmt(v)] for k, v in m.items()], ["METRIC", "VALUE"]))


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.specs import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.set)
    except SpecError as e:
        raise CliError(str(e), 2) from None
    body = {"spec": spec.model_dump(mode="json"), "max_retries": args.max_retries}
    # A key per invocation makes the client's own retries safe; --idempotency-key makes reruns safe.
    headers = {"Idempotency-Key": args.idempotency_key or f"cli-{uuid.uuid4()}"}
    with _client(args) as c:
        job = _request_with_retries(c, "POST", "/v1/jobs", json=body, headers=headers)
    if args.json and not args.follow:
        print(json.dumps(job, indent=2))
    else:
        print(f"submitted {job['id']} ({job['name']}): {job['state']}", file=sys.stderr if args.follow else sys.stdout)
    if args.follow:
        return _follow(args, job["id"])
    return 0


def _request_with_retries(c: httpx.Client, method: str, url: str, attempts: int = 3, **kw: Any) -> Any:
    for i in range(attempts):
        try:
            return _check(c.request(method, url, **kw))
        except httpx.TransportError as e:
            if i == attempts - 1:
                raise CliError(f"cannot reach the API at {c.base_url}: {e}") from None
            time.sleep(0.5 * 2**i)
    raise AssertionError("unreachable")


def _follow(args: argparse.Namespace, job_id: str) -> int:
    with _client(args) as c:
        try:
            with c.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None) as r:
                if not r.is_success:
                    r.read()
                    _check(r)
                for chunk in r.iter_text():
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on (orch cancel {job_id} to stop it)", file=sys.stderr)
            return 130
        job = _check(c.get(f"/v1/jobs/{job_id}"))
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(f"\njob {job_id}: {job['state']} ({job['message']})", file=sys.stderr)
    return 0 if job["state"] == "SUCCEEDED" else 1


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = _check(c.get("/v1/jobs", params={"state": args.state or [], "limit": args.limit}))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [[j["id"], j["name"], j["state"], j["attempts"],
             f"{(j['metrics'] or {}).get('step', '-')}/{(j['metrics'] or {}).get('total_steps', '-')}",
             _fmt((j["metrics"] or {}).get("loss", "-")), _age(j["created_at"])] for j in data["data"]]
    print(table(rows, ["ID", "NAME", "STATE", "ATTEMPTS", "STEP", "LOSS", "AGE"]))
    if data["count"] > len(rows):
        print(f"({len(rows)} of {data['count']}; --limit to see more)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = _check(c.get(f"/v1/jobs/{args.id}"))
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        _print_job(job)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        args.json = False
        return _follow(args, args.id)
    params = {"attempt": args.attempt} if args.attempt else {}
    with _client(args) as c:
        data = _check(c.get(f"/v1/jobs/{args.id}/logs", params=params))
    sys.stdout.write(data["logs"])
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = _check(c.post(f"/v1/jobs/{args.id}/cancel"))
    print(json.dumps(job, indent=2) if args.json else f"cancel requested for {job['id']} (now {job['state']})")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = _check(c.get("/v1/cluster"))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(table([[k, v["nodes"], ", ".join(f"{r}={_fmt(a)}" for r, a in sorted(v["resources"].items()))]
                 for k, v in data["by_kind"].items()], ["KIND", "NODES", "RESOURCES"]))
    return 0


# -- the service -----------------------------------------------------------------------------------


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


def _die_of(signum: int) -> None:
    """Ends this process by ``signum``'s default action, so whoever sent it sees that it worked (Python
    does the same after an uncaught KeyboardInterrupt); systemd counts that as a clean stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def cmd_up(args: argparse.Namespace) -> int:
    import secrets

    from orchestrator.settings import SettingsError, load_settings, write_secret

    overrides: dict[str, Any] = {"port": args.port} if args.port else {}
    if args.local:
        overrides["local"] = True
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        raise CliError(f"refusing to start: {e}", 2) from None
    settings.token  # noqa: B018 - local mode: made (or read) now, so the CLI on this machine finds it
    previous_handlers = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    head = None
    stopped_by: int | None = None
    try:
        if not settings.ray_address:
            from orchestrator.local_ray import LocalRayHead

            ray_token = secrets.token_hex(32)
            token_file = settings.state_dir / "ray_auth_token"
            write_secret(token_file, ray_token)
            head = LocalRayHead(settings.state_dir / "ray", num_cpus=args.num_cpus, auth_token=ray_token)
            print(f"starting a local Ray head (logs: {head.log_path}) ...", file=sys.stderr)
            head.start()
            settings = load_settings(**overrides, ray_address=head.dashboard_url, ray_auth_token=ray_token)
            print(f"Ray dashboard {head.dashboard_url}, token auth on; for `ray job submit` against it: "
                  f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {token_file}) RAY_ADDRESS={head.dashboard_url}",
                  file=sys.stderr)
        from orchestrator.api.app import create_app
        from orchestrator.server import serve

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
                print("stopping the local Ray head ...", file=sys.stderr)
                head.stop()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
    if stopped_by is not None:
        _die_of(stopped_by)
        return 128 + stopped_by  # the shell's convention, should the signal's action not end us
    return 0


# -- argument parsing ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orch", description="MoE training control plane")
    p.add_argument("--url", default=os.environ.get("ORCH_URL", DEFAULT_URL), help="API base URL (ORCH_URL)")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start the API (and a local Ray head unless RAY_ADDRESS is set)")
    up.add_argument("--port", type=int, help="API port (default 8080, ORCH_PORT)")
    up.add_argument("--local", action="store_true", help="local mode: make an API token if none is set")
    up.add_argument("--num-cpus", type=int, help="CPUs the local Ray head offers (default: all)")
    up.set_defaults(fn=cmd_up)

    s = sub.add_parser("submit", help="submit a job spec (YAML or JSON)")
    s.add_argument("spec", help="e.g. jobs/examples/demo.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    s.add_argument("--max-retries", type=int, default=2, help="new attempts after a lost driver (0-10)")
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    s.add_argument("--follow", "-f", action="store_true", help="stream the logs until the job ends")
    s.set_defaults(fn=cmd_submit)

    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--state", action="append", choices=STATES, help="filter (repeatable)")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(fn=cmd_list)

    st = sub.add_parser("status", help="one job: state, history, attempts, metrics")
    st.add_argument("id")
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", help="a job's driver logs")
    lg.add_argument("id")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.add_argument("--attempt", type=int, help="attempt number (default: the latest)")
    lg.set_defaults(fn=cmd_logs)

    ca = sub.add_parser("cancel", help="cancel a job")
    ca.add_argument("id")
    ca.set_defaults(fn=cmd_cancel)

    cl = sub.add_parser("cluster", help="nodes and resources by kind")
    cl.set_defaults(fn=cmd_cluster)

    for cmd in (s, ls, st, ca, cl):
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    try:
        return args.fn(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except httpx.TransportError as e:
        print(f"error: cannot reach the API at {args.url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
