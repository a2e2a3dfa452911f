"""The data section's tables (tests/bench/data.py measures; this writes BENCHMARKS.md's part)."""

from __future__ import annotations

from tests.bench.data import GOALS, MB, SHARD_TOKENS, SIZES_ENV
from tests.bench.data_exact import exact_markdown
from tests.bench.data_prepare import BPE_VOCAB, PREP_INPUT_BYTES, PREP_TASKS
from tests.bench.data_s3 import s3_markdown


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _goal(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(sets: dict[str, dict], prep: dict[str, dict], steps: int, s3: dict) -> list[str]:
    small, large = sets["small"], sets["large"]
    md = ["## Data plane: memory as the data grows, Ray Data vs pyarrow, data wait, preparation", "",
          f"`python -m tests.bench --sections data` (tests/bench/data.py): shards of random byte ids in the "
          f"prepared format, {small['size_gb']:g} GB ({small['shards']} shards) vs {large['size_gb']:g} GB "
          f"({large['shards']} shards) of files, {SHARD_TOKENS // 2**20} Mi tokens per shard; the demo spec "
          f"(2 CPU workers, global batch {small['ray']['batch_rows']} x {small['ray']['seq_len']} + 1 tokens); `{SIZES_ENV}=SMALL,LARGE` sets the sizes.", "",
          "Memory: peaks sampled every 0.2 s of the summed RSS of the driver and every Ray worker process (the "
          "raylet's children), the same without shared pages (each reader's mapped object-store pages count in "
          "its RSS), and the object store's used bytes; before = the summed RSS when the pass started (what "
          "earlier passes left: each kind of pass runs over both sets in turn, so both start alike). \"Ray's read_parquet\": the same pass with "
          "`ray.data.read_parquet` (seeded file order, a `map_batches` packing each block) in place of the "
          "workers' stream (workers/data/stream.py: one Ray Data execution over the row groups the rank will "
          f"take, a read task per 16 MiB of them, the first alone; {small['ray'].get('executions', '?')} execution(s) for "
          f"{small['ray'].get('units', '?')} row groups at {small['size_gb']:g} GB, "
          f"{large['ray'].get('executions', '?')} for {large['ray'].get('units', '?')} at {large['size_gb']:g} GB): "
          "the input path before the manifest-planned sources.", "",
          "| pass | set | GiB RSS | GiB RSS without shared | GiB object store | GiB RSS before | seconds |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for kind, label in (("ray", "data only, one epoch"), ("read_parquet", "data only, Ray's read_parquet"),
                        ("train", f"training, {steps} steps")):
        for s in (small, large):
            p = s[kind]["memory"]["peak"]
            md.append(f"| {label} | {s['size_gb']:g} GB | {_gib(p['rss_bytes'])} | {_gib(p['private_bytes'])} | "
                      f"{_gib(p['store_bytes'])} | {_gib(s[kind]['memory']['idle']['rss_bytes'])} | "
                      f"{s[kind]['seconds']:.0f} |")
        ratio = {k: large[kind]["memory"]["peak"][k] / max(small[kind]["memory"]["peak"][k], 1)
                 for k in ("rss_bytes", "private_bytes", "store_bytes")}
        if kind == "read_parquet":  # the alternative, shown beside the goal's passes
            goal, shown = "", f"{ratio['rss_bytes']:.2f}"
        else:
            goal = f" (goal <= {GOALS['memory_ratio']})"
            shown = f"**{ratio['rss_bytes']:.2f}** ({_goal(ratio['rss_bytes'] <= GOALS['memory_ratio'])})"
        md.append(f"| {label}: large / small{goal} | | {shown} | {ratio['private_bytes']:.2f} | "
                  f"{ratio['store_bytes']:.2f} | | |")
    speed = small["speed"]
    arrow, side = speed["arrow"], speed["stream"]
    ratio = side["rows_per_s"] / arrow["rows_per_s"]
    md += ["", "Rows/s of global batches into the trainer (int64 tensors): a worker's stream (its Ray Data read "
               "tasks, the epoch's order) taking the whole global batch vs pyarrow reading the same files one "
               f"after the other in the driver. Side by side: {len(speed['ratios'])} rounds of one pass each, "
               "alternating, no memory sampler, each side's median round (the rounds' ratios: "
               f"{', '.join(f'{x:.2f}' for x in speed['ratios'])}); the other rows are the memory passes above "
               "(sampler on, minutes apart), over the same pyarrow figure. Steady = after the first batch; reader "
               "s = time spent getting rows:", "",
           "| read | set | rows/s | / pyarrow (goal >= 0.7) | steady rows/s | first batch s | reader s | total s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, s, r in (("pyarrow, one file after the other (side by side)", small, arrow),
                        ("Ray Data, a worker's stream (side by side)", small, side),
                        ("Ray Data, a worker's stream (memory pass)", small, small["ray"]),
                        ("Ray Data, a worker's stream (memory pass)", large, large["ray"]),
                        ("Ray Data, Ray's read_parquet (memory pass)", small, small["read_parquet"]),
                        ("Ray Data, Ray's read_parquet (memory pass)", large, large["read_parquet"])):
        r_ratio = r["rows_per_s"] / arrow["rows_per_s"]
        shown = f"**{ratio:.2f}** ({_goal(ratio >= GOALS['ray_vs_arrow'])})" if r is side else f"{r_ratio:.2f}"
        md.append(f"| {label} | {s['size_gb']:g} GB | {r['rows_per_s']:,.0f} | {shown} | "
                  f"{r['steady_rows_per_s']:,.0f} | {r['first_batch_s']:.1f} | {r['reader_s']:.0f} | "
                  f"{r['seconds']:.0f} |")
    md += ["", "Data wait: time in the loop's data `next` over the time between steps, steps 2.. of the run; "
           "whole run = all waits, the first (the pipeline starting) included, over the loop's time; worst rank:",
           "", "| training run | s per step | data wait share (goal <= 5%) | whole run | longest wait s | "
               "first batch s |", "|---|---:|---:|---:|---:|---:|"]
    for s in (small, large):
        worst = max(s["train"]["ranks"], key=lambda r: r["share"])
        md.append(f"| {s['size_gb']:g} GB, {steps} steps | {worst['step_s']:.2f} | **{worst['share']:.1%}** "
                  f"({_goal(worst['share'] <= GOALS['wait_share'])}) | {worst['run_share']:.0%} | "
                  f"{worst['max_wait_s']:.3f} | {worst['first_batch_s']:.0f} |")
    md += exact_markdown(small["exact"], small["size_gb"])
    md += ["", f"Opening a set before a run (`open_training_data`: manifest and tokenizer; each row group is "
               f"verified by the read task that reads it): {small['verify_s']:.2f} s for {small['size_gb']:g} GB, "
               f"{large['verify_s']:.2f} s for {large['size_gb']:g} GB.", "",
           f"Preparation (`prepare` with `ray_runner`, {PREP_TASKS} tasks at once) of {PREP_INPUT_BYTES / MB:.0f} MB "
           f"of the standard library; per core = input MB / shard-phase s / tasks; per CPU-s = input MB / CPU "
           f"seconds of the task processes (other users' load does not move it); end to end includes planning and "
           f"BPE training on the slice ({BPE_VOCAB} ids):", "",
           "| tokenizer | MB/s per core | MB per CPU-s | end-to-end MB/s | tokens per byte |", "|---|---:|---:|---:|---:|"]
    md += [f"| {t} | {p['mb_per_s_per_core']:.2f} | {p['mb_per_cpu_s']:.2f} | {p['end_to_end_mb_per_s']:.2f} | "
           f"{p['tokens_per_byte']:.3f} |" for t, p in prep.items()]
    return md + s3_markdown(s3)
