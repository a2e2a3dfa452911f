"""Heterogeneous balancing vs equal split: three workers of speeds 1 : 2 : 4 on one machine.

The speeds are made on purpose, in this benchmark only: each worker's model forward sleeps
``SLOW_S_PER_ROW / speed`` per sequence, wrapped around the product's loop by this module's own
per-worker function (``build_trainer(train_loop=...)``), so a worker's compute time is
proportional to its rows over its speed, as on a slower device; the product's loop does not know.
The speed-aware split measures the forward pass (workers/balance.py), so it sees the slowdown as
it would see a slower device.

Figure of merit: achieved tokens/s of the 3-worker job / the sum of each worker's tokens/s when it
trains alone at its speed (its solo run). The equal split waits for the slowest worker at every
step: 3 / (1 + 2 + 4) = 0.43 of the sum at best. Throughput is taken from the progress records
after ``WARM_STEPS`` (the split's first measurement and the warm-up are behind).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from jobs.specs.train import load_spec
from tests.conftest import DEMO

SPEEDS = (1, 2, 4)
# Seconds of forward per sequence at speed 1: large against the tiny model's real compute and the
# per-step overheads (sync, progress), so the speeds are what the split sees.
SLOW_S_PER_ROW = 0.05
STEPS = 40
LOG_EVERY = 5
WARM_STEPS = 10  # excluded from the throughput: warm-up, and the equal split before the first measurement
SETS = [
    "data.max_bytes=300000", "data.seq_len=32", "model.max_seq_len=32", "model.n_layers=1", "model.d_model=32",
    "model.n_heads=2", "model.expert_hidden=32", "train.batch_size=16", f"train.log_every={LOG_EVERY}",
    "train.warmup_steps=5", "train.eval_batches=0", "train.checkpoint_every=100000", "train.split_every=5",
    "resources.max_failures=0",
]


def slowed_loop(config: dict[str, Any], *, seconds_per_row_by_rank: list[float]) -> None:
    """The product's per-worker loop with this rank's forward slowed to its speed (this process only)."""
    import ray.train

    from workers.loop import train_loop_per_worker
    from workers.moe.model import MoETransformer

    seconds_per_row = seconds_per_row_by_rank[ray.train.get_context().get_world_rank()]
    forward = MoETransformer.forward

    def slow_forward(self: MoETransformer, idx: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds_per_row * idx.shape[0])  # idx: (batch, seq_len)
        return forward(self, idx, *args, **kwargs)

    MoETransformer.forward = slow_forward
    train_loop_per_worker(config)


def _run(scratch: Path, name: str, speeds: tuple[int, ...], split: str, steps: int, reuse: bool) -> dict:
    """One job of len(speeds) workers: its steady tokens/s (mean over the records after WARM_STEPS)."""
    from ray.util.queue import Queue

    from jobs.runtime.trainer import build_trainer
    from workers.data import build_shards
    from workers.progress import PROGRESS

    out = scratch / name
    saved = out / "result.json"
    if reuse and saved.exists():
        print(f"bench: balance {name}: reusing {saved}", flush=True)
        return json.loads(saved.read_text())
    print(f"bench: balance {name} ...", flush=True)
    spec = load_spec(DEMO, [*SETS, f"data.path={scratch / 'shards'}", f"train.steps={steps}",
                            f"train.split={split}", f"resources.num_workers={len(speeds)}"])
    manifest = build_shards(spec.data, lambda msg: None)
    queue = Queue()
    loop = functools.partial(slowed_loop, seconds_per_row_by_rank=[SLOW_S_PER_ROW / s for s in speeds])
    build_trainer(spec, manifest, out, progress=queue, train_loop=loop).fit()
    records = []
    while not queue.empty():
        kind, record = queue.get()
        if kind == PROGRESS:
            records.append(record)
    steady = [r.tokens_per_s for r in records if r.step > WARM_STEPS]
    result = {"name": name, "speeds": list(speeds), "split": split, "tokens_per_s": sum(steady) / len(steady),
              "final_loss": records[-1].loss}
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


def balance_section(scratch: Path, steps: int | None = None, reuse: bool = False) -> dict:
    from jobs.runtime.trainer import init_ray

    steps = steps or STEPS
    scratch = scratch / "balance"
    init_ray(load_spec(DEMO, [*SETS, f"resources.num_workers={len(SPEEDS)}"]), verbose=False)
    solo = {s: _run(scratch, f"solo_speed{s}", (s,), "equal", steps, reuse) for s in SPEEDS}
    ideal = sum(r["tokens_per_s"] for r in solo.values())
    jobs = {split: _run(scratch, f"three_{split}", SPEEDS, split, steps, reuse) for split in ("equal", "speed")}
    ratios = {split: r["tokens_per_s"] / ideal for split, r in jobs.items()}
    md = ["## Heterogeneous balancing vs equal split", "",
          f"`python -m tests.bench --sections balance`: three workers of speeds {':'.join(map(str, SPEEDS))} "
          f"(each forward sleeps {SLOW_S_PER_ROW} s / speed per sequence, on purpose; tests/bench/balance.py), "
          f"global batch 48 sequences, {steps} steps; tokens/s over the steps after {WARM_STEPS}.", "",
          "| run | tokens/s | / sum of solo tokens/s |", "|---|---:|---:|"]
    md += [f"| solo, speed {s} | {r['tokens_per_s']:.0f} | |" for s, r in solo.items()]
    md += [f"| sum of the three solo runs | {ideal:.0f} | 1.00 |"]
    md += [f"| 3 workers, {split} split | {jobs[split]['tokens_per_s']:.0f} | {ratios[split]:.2f} |"
           for split in ("equal", "speed")]
    md += ["", f"The equal split cannot pass {len(SPEEDS) * min(SPEEDS) / sum(SPEEDS):.2f} (every step waits "
               "for the slowest worker); the speed-aware split gives each worker rows in proportion to its "
               "measured speed, and the loss is weighted by tokens so the update is the equal split's."]
    return {"data": {"name": "balance", "solo": solo, "jobs": jobs, "ratios": ratios}, "markdown": md}
