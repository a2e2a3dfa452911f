"""Local steps with a compressed outer sync (``compression.method: local``) against dense, per-step
top-k and DiLoCo: the bytes-vs-loss frontier, and time to loss over a slow link.

``local-frontier``: every variant of ``FRONTIER`` for the same steps, side by side (2 gloo ranks on
plain loopback, tests/bench/local_sgd.py): held-out loss gap vs dense, dense bytes / bytes sent,
tokens/s vs dense.

``local-link``: the same 2-rank step inside a network namespace whose loopback is shaped by ``tc``
(token bucket at 1 Gbit/s and 100 Mbit/s, ``lo`` at MTU 1500 so that tbf passes its frames). The
target is dense's final held-out loss at the frontier's steps; each variant's wall-clock time to
it, training time only (the evals stop the clock). Dense's trajectory on a shaped link is the one
it has on plain loopback (same computation, same bits): only its time per step changes, so dense
is timed over ``DENSE_LINK_STEPS`` steps in the namespace and its time to its own final loss is
that rate times its steps. The local setting runs whole, with its schedule stretched to
``LINK_STRETCH`` times the steps, until its eval curve crosses the target. Needs root (``ip
netns``, ``tc``); otherwise the section says so and skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import local_sgd

ROOT = Path(__file__).resolve().parents[2]
STEPS = 300
FRONTIER = ["dense", "topk_1pct", "diloco_h8", "local_h4_3pct", "local_h4_3pct_olr15", "local_h4_3pct_4bit_olr15",
            "local_h4_3pct_8bit_olr15", "local_h8_3pct_olr15", "local_h8_1pct", "sweep_loss", "sweep_100x", "sweep_1000x"]
HORIZON_STEPS = 900
FRONTIER_900 = ["dense", "topk_1pct", "diloco_h8", "local_h4_3pct_olr15", "local_h4_3pct_4bit_olr15",
                "local_h4_3pct_8bit_olr15", "local_h4_6pct_olr15", "local_h8_3pct_olr15", "local_h8_3pct_4bit_olr15",
                "local_h16_3pct_olr2", "sweep_loss", "sweep_100x", "sweep_1000x"]
GOALS_900 = ((100, 2.0), (400, 4.0), (1000, 2.0))  # (dense / sent at least, eval gap % at most); the last a moonshot
LINKS = (("1 Gbit/s", "1gbit"), ("100 Mbit/s", "100mbit"))
DENSE_LINK_STEPS = 48  # a multiple of local_sgd.EVAL_EVERY
LINK_STRETCH = 2
# The local setting timed on the links: the frontier's lowest eval gap among the local settings
# that send at least this many times fewer bytes than dense; DEFAULT_LINK_VARIANT without a frontier.
LINK_MIN_RATIO = 100
DEFAULT_LINK_VARIANT = "local_h4_3pct_4bit_olr15"
GOAL_SPEEDUP = 3.0  # dense's loss at least this many times sooner than dense, on 100 Mbit/s
GOAL_THROUGHPUT = 0.95  # tokens/s vs dense on plain loopback
NETNS = f"moe-bench-{os.getpid()}"


def _say(line: str) -> None:
    print(f"bench local: {line}", flush=True)


def _gap(row: dict, dense: dict) -> float:
    return 100 * (row["eval"] / dense["eval"] - 1)


def frontier_section(steps: int | None = None) -> dict:
    """The frontier at the demo's 300 steps (no goal: the horizon is too short for any method here)."""
    steps = steps or STEPS
    _say(f"frontier: {len(FRONTIER)} variants x {steps} steps, 2 gloo ranks on loopback")
    return frontier_result(local_sgd.run(FRONTIER, steps), steps, "local_frontier")


def horizon_section(steps: int | None = None) -> dict:
    """The frontier at 900 steps, where the issue's goals are set (GOALS_900)."""
    steps = steps or HORIZON_STEPS
    _say(f"frontier: {len(FRONTIER_900)} variants x {steps} steps, 2 gloo ranks on loopback")
    return frontier_result(local_sgd.run(FRONTIER_900, steps), steps, "local_frontier_900", GOALS_900)


def frontier_result(rows: dict[str, dict], steps: int, name: str, goals: tuple = ()) -> dict:
    """A frontier section from ``local_sgd.run`` rows: the table and, per goal (min ratio, max gap %),
    the best row meeting it."""
    dense = rows["dense"]
    for key, r in rows.items():
        r.update(name=key, eval_gap_pct=_gap(r, dense), ratio=r["dense"] / r["wire"] if r["wire"] else None,
                 throughput_vs_dense=r["tokens_per_s"] / dense["tokens_per_s"])
    md = [f"## Local steps vs dense, per-step top-k and DiLoCo: the bytes frontier ({steps} steps, demo model, 2 ranks)",
          "",
          f"`python -m tests.bench --sections {name.replace('_', '-').replace('frontier-900', 'horizon')}` "
          "(tests/bench/local_sections.py, local_sgd.py): the "
          "product's training step (workers/step.py) on the demo spec's model and schedule, 2 gloo processes on "
          "loopback (no Ray), one torch thread each, the same seed and batches (byte windows of the standard "
          "library source); eval = held-out loss of the weights the ranks agree on, 2 x 8 batches of 16 x 128 "
          "tokens. dense / sent: bytes a dense ring allreduce after every step would send over bytes sent "
          "(indices, values, scales, token weights and dense warm-up all counted). Every variant but the "
          "per-step top-k trains with AdamW and the global clip 1.0; local = `compression.method: local` "
          "(error decay 0.95, no warm-up, outer lr 1 unless the label says otherwise).", "",
          "| variant | eval loss | gap vs dense | bytes sent | dense / sent | tokens/s vs dense |",
          "|---|---|---|---|---|---|"]
    for r in rows.values():
        ratio = f"{r['ratio']:.0f}x" if r["ratio"] else "n/a"
        md.append(f"| {r['label']} | {r['eval']:.4f} | {r['eval_gap_pct']:+.2f}% | {r['wire'] / 1e6:.1f} MB | "
                  f"{ratio} | {r['throughput_vs_dense']:.2f} |")
    met = []
    for min_ratio, max_gap in goals:
        fits = [r for r in rows.values() if (r["ratio"] or 0) >= min_ratio and r["eval_gap_pct"] <= max_gap]
        best = max(fits, key=lambda r: r["ratio"], default=None)
        met.append({"min_ratio": min_ratio, "max_gap_pct": max_gap, "best": best and best["name"]})
        verdict = (f"met by {best['label']} ({best['ratio']:.0f}x at {best['eval_gap_pct']:+.2f}%)" if best
                   else "not met")
        md += ([""] if len(met) == 1 else []) + [f"- Goal >= {min_ratio}x fewer bytes at <= {max_gap}% eval gap: {verdict}."]
    return {"data": {"name": name, "steps": steps, "rows": list(rows.values()), "goals": met}, "markdown": md}


def _frontier() -> dict | None:
    """The frontier section's data from BENCHMARKS.json (this run's, when it ran first)."""
    path = ROOT / "BENCHMARKS.json"
    if not path.exists():
        return None
    return next((s for s in json.loads(path.read_text())["sections"] if s.get("name") == "local_frontier"), None)


def _link_variant(frontier: dict | None) -> str:
    if frontier is None:
        return DEFAULT_LINK_VARIANT
    local = [r for r in frontier["rows"] if r["name"].startswith("local_") and (r["ratio"] or 0) >= LINK_MIN_RATIO]
    return min(local, key=lambda r: r["eval"])["name"] if local else DEFAULT_LINK_VARIANT


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _shaped(rate: str, names: list[str], steps: int) -> dict[str, dict]:
    """local_sgd.run of ``names`` inside a fresh network namespace whose loopback is shaped to ``rate``."""
    try:
        _ip("netns", "add", NETNS)
        _ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "mtu", "1500")
        _ip("netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", NETNS, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                        "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True, text=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            r = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, "-m", "tests.bench.local_sgd",
                                "--steps", str(steps), "--variants", ",".join(names), "--json", str(out)],
                               cwd=ROOT, text=True, capture_output=True)
            if r.returncode != 0:
                raise SystemExit(f"bench local: shaped run at {rate} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            return json.loads(out.read_text())
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def time_to(curve: list[list[float]], target: float) -> tuple[float | None, int | None]:
    """(training seconds, step) where an eval curve [[step, seconds, loss], ...] first reaches
    ``target``, linear between evals; (None, None) when it never does."""
    previous = None
    for step, seconds, loss in curve:
        if loss <= target:
            if previous is None:
                return seconds, step
            s0, t0, l0 = previous
            f = (l0 - target) / (l0 - loss)
            return t0 + f * (seconds - t0), round(s0 + f * (step - s0))
        previous = (step, seconds, loss)
    return None, None


def _skip(reason: str) -> dict:
    _say(f"link: skipped: {reason}")
    return {"data": {"name": "local_link", "skipped": reason},
            "markdown": ["## Local steps over a slow link: time to dense's loss", "", f"Skipped: {reason}."]}


def link_section(steps: int | None = None) -> dict:
    steps = steps or STEPS
    if os.geteuid() != 0:
        return _skip("not root: a network namespace and tc shaping need root (run `python -m tests.bench "
                     "--sections local-link` as root)")
    frontier = _frontier()
    if frontier is None or frontier["steps"] != steps:
        _say("link: no frontier of this length in BENCHMARKS.json; running dense and the default local setting")
        frontier = None
        plain = local_sgd.run(["dense", DEFAULT_LINK_VARIANT], steps)
        plain_rows = {n: {**r, "name": n} for n, r in plain.items()}
    else:
        plain_rows = {r["name"]: r for r in frontier["rows"]}
    name = _link_variant(frontier)
    if name not in plain_rows:
        plain_rows[name] = {**local_sgd.run([name], steps)[name], "name": name}
    dense_plain, local_plain = plain_rows["dense"], plain_rows[name]
    target = dense_plain["eval"]
    _say(f"link: target {target:.4f} (dense's eval at {steps} steps); local setting {name}")
    rows: list[dict[str, Any]] = []
    for label, rate in LINKS:
        _say(f"link {label}: dense for {DENSE_LINK_STEPS} steps, then {name} for {LINK_STRETCH * steps} steps")
        dense = _shaped(rate, ["dense"], DENSE_LINK_STEPS)["dense"]
        local = _shaped(rate, [name], LINK_STRETCH * steps)[name]
        dense_time = dense["seconds"] / DENSE_LINK_STEPS * steps
        local_time, local_step = time_to(local["curve"], target)
        rows.append({"link": label, "rate": rate, "dense_s_per_step": dense["seconds"] / DENSE_LINK_STEPS,
                     "dense_time_to_target_s": dense_time, "dense_tokens_per_s": dense["tokens_per_s"],
                     "local": name, "local_steps_run": LINK_STRETCH * steps, "local_time_to_target_s": local_time,
                     "local_step_at_target": local_step, "local_tokens_per_s": local["tokens_per_s"],
                     "local_final_eval": local["eval"], "local_curve": local["curve"],
                     "speedup": dense_time / local_time if local_time else None})
    plain_ratio = local_plain["tokens_per_s"] / dense_plain["tokens_per_s"]
    return {"data": {"name": "local_link", "steps": steps, "target_eval": target, "local": name,
                     "plain_tokens_per_s_vs_dense": plain_ratio, "rows": rows},
            "markdown": _link_markdown(steps, target, name, local_plain, dense_plain, plain_ratio, rows)}


def _link_markdown(steps: int, target: float, name: str, local_plain: dict, dense_plain: dict,
                   plain_ratio: float, rows: list[dict]) -> list[str]:
    label = local_sgd.VARIANTS[name][0]
    md = [f"## Local steps over a slow link: time to dense's {steps}-step loss (demo model, 2 ranks)", "",
          "`python -m tests.bench --sections local-link` (as root; tests/bench/local_sections.py): the frontier's "
          "2-rank step inside a network namespace whose loopback is shaped with "
          "`tc qdisc add dev lo root tbf rate R burst 32kbit latency 400ms` (`lo` at MTU 1500); both ranks' "
          "traffic shares the one shaped device. Target: dense's held-out loss after its "
          f"{steps} steps ({target:.4f}, the frontier's dense row). Dense's time to it = its seconds per step "
          f"on that link (measured over {DENSE_LINK_STEPS} steps in the namespace; its trajectory is the "
          f"plain-loopback one) x {steps}. The local setting ({label}: the frontier's lowest gap at >= "
          f"{LINK_MIN_RATIO}x fewer bytes) runs whole in the namespace with its schedule stretched to "
          f"{LINK_STRETCH * steps} steps; its time = training seconds until its eval curve (every "
          f"{local_sgd.EVAL_EVERY} steps, linear between) reaches the target. Goal: >= {GOAL_SPEEDUP:.0f}x sooner "
          f"on 100 Mbit/s; >= {GOAL_THROUGHPUT} of dense's tokens/s on plain loopback.", "",
          "| link | dense s/step | dense: s to target | local: s to target (step) | speed-up | "
          "dense tokens/s | local tokens/s |",
          "|---|---|---|---|---|---|---|",
          f"| loopback (unshaped) | {dense_plain['seconds'] / dense_plain['steps']:.3f} | "
          f"{dense_plain['seconds']:.0f} | | | {dense_plain['tokens_per_s']:.0f} | "
          f"{local_plain['tokens_per_s']:.0f} ({plain_ratio:.2f}x) |"]
    for r in rows:
        reached = (f"{r['local_time_to_target_s']:.0f} ({r['local_step_at_target']})" if r["local_time_to_target_s"]
                   else f"not reached in {r['local_steps_run']} steps (final {r['local_final_eval']:.4f})")
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        md.append(f"| {r['link']} | {r['dense_s_per_step']:.3f} | {r['dense_time_to_target_s']:.0f} | {reached} | "
                  f"{speedup} | {r['dense_tokens_per_s']:.0f} | {r['local_tokens_per_s']:.0f} |")
    slow = rows[-1]
    met = slow["speedup"] is not None and slow["speedup"] >= GOAL_SPEEDUP
    md += ["", f"Link goal ({GOAL_SPEEDUP:.0f}x on 100 Mbit/s): {'met' if met else 'not met'}; loopback throughput "
               f"goal ({GOAL_THROUGHPUT}x): {'met' if plain_ratio >= GOAL_THROUGHPUT else 'not met'}."]
    return md
