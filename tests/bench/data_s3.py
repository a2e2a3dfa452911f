"""S3 reads of the same shards through pyarrow's own client and through s3fs (issue #24, point 5).

A real S3-protocol server (moto's, as tests/support/servers.py runs it) in a child process on loopback, so
the server's Python does not share this process's interpreter lock with the client measured. The
same prepared shards (row groups of ``ROW_GROUP_BYTES``, tests/bench/data.py ``random_docs``) are
uploaded once, then read by the product's read path (workers/data/reader.py ``read_unit``: one row
group, verified) through:
- pyarrow's ``S3FileSystem`` as ``open_fs`` builds it (the hot path), and
- s3fs behind pyarrow's fsspec handler, as ``open_small_fs`` builds it,
alternating, ``ROUNDS`` rounds each; the best round of each is reported (the least disturbed by the
other users of a shared machine). Small objects beside them: one manifest-sized GET, and a listing
of the prefix, ``SMALL_REPEATS`` times each. Loopback has no network latency, so these are the
clients' own costs; on a real bucket both wait on the same round trips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from tests.support.servers import free_port
from workers.waiting import wait_until

SHARDS = 4
SHARD_TOKENS = 4 * 1024 * 1024  # 8 MiB of uint16 tokens per shard
ROW_GROUP_BYTES = 1024 * 1024
ROUNDS = 5
SMALL_REPEATS = 20
SEQ_LEN = 1024
SERVER_START_S = 60.0
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def _server() -> tuple[subprocess.Popen, str]:
    import pyarrow.fs as pafs

    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key="bench",
                              secret_key="bench", allow_bucket_creation=True).create_dir("bench")
            return True
        except OSError:
            return False

    wait_until(up, timeout_s=SERVER_START_S, interval_s=0.2, what="the S3 server to answer")
    return proc, endpoint


def _upload(fs: Any, root: str) -> list[Any]:
    """The shards, written once through pyarrow; their units (one per row group)."""
    from tests.bench.data import random_docs
    from workers.data.order import Unit
    from workers.data.shards import write_shard

    units = []
    rng = np.random.default_rng(0)
    for i in range(SHARDS):
        docs = random_docs(rng, SHARD_TOKENS)
        raw, groups = write_shard([""] * len(docs), docs, ROW_GROUP_BYTES)
        path = f"{root}/shards/train-{i:05d}.parquet"
        with fs.open_output_stream(path) as f:
            f.write(raw)
        units += [Unit(path, g_i, g.tokens, g.sha256, g.stored_bytes) for g_i, g in enumerate(groups)]
    with fs.open_output_stream(f"{root}/manifest.json") as f:
        f.write(b"{" + b" " * 30_000 + b"}")  # a manifest of ~30 KB: hundreds of shard entries
    return units


def _read_all(fs: Any, units: list[Any]) -> float:
    from workers.data.reader import read_unit

    started = time.perf_counter()
    for unit in units:
        read_unit(fs, unit, SEQ_LEN, None)
    return time.perf_counter() - started


def _small(fs: Any, root: str) -> dict[str, float]:
    import pyarrow.fs as pafs

    from workers.data.storage import read_bytes

    started = time.perf_counter()
    for _ in range(SMALL_REPEATS):
        read_bytes(fs, f"{root}/manifest.json")
    get_s = (time.perf_counter() - started) / SMALL_REPEATS
    started = time.perf_counter()
    for _ in range(SMALL_REPEATS):
        fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {"get_ms": get_s * 1e3, "list_ms": (time.perf_counter() - started) / SMALL_REPEATS * 1e3}


def s3_section() -> dict[str, Any]:
    from workers.data.storage import open_fs, open_small_fs

    proc, endpoint = _server()
    saved = {k: os.environ.get(k) for k in (*KEYS, "AWS_ENDPOINT_URL")}
    os.environ.update({**KEYS, "AWS_ENDPOINT_URL": endpoint})
    try:
        clients = {"pyarrow": open_fs("s3://bench/ds")[0], "s3fs": open_small_fs("s3://bench/ds")[0]}
        units = _upload(clients["pyarrow"], "bench/ds")
        stored = sum(u.stored_bytes for u in units)
        rounds: dict[str, list[float]] = {name: [] for name in clients}
        _read_all(clients["s3fs"], units[:2])  # each client's connections opened before the clock
        _read_all(clients["pyarrow"], units[:2])
        for _ in range(ROUNDS):
            for name, fs in clients.items():
                rounds[name].append(_read_all(fs, units))
        out = {name: {"seconds": min(r), "mb_per_s": stored / 1e6 / min(r), "rounds_s": r,
                      **_small(clients[name], "bench/ds")} for name, r in rounds.items()}
        return {"shards": SHARDS, "row_groups": len(units), "stored_bytes": stored, "clients": out,
                "hot_path": max(out, key=lambda n: out[n]["mb_per_s"])}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def s3_markdown(r: dict[str, Any]) -> list[str]:
    c = r["clients"]
    md = ["", f"S3 clients side by side (tests/bench/data_s3.py): {r['shards']} shards, {r['row_groups']} row groups "
              f"of {ROW_GROUP_BYTES >> 20} MiB ({r['stored_bytes'] / 1e6:.0f} MB stored) on a real S3-protocol "
              f"server (moto) in a child process on loopback, each row group read and verified by the product's "
              f"`read_unit`; best of {ROUNDS} alternating rounds. Small objects: one ~30 KB GET and one listing "
              f"of the prefix, mean of {SMALL_REPEATS}:", "",
          "| client | MB/s reading row groups | / pyarrow | small GET ms | listing ms |", "|---|---:|---:|---:|---:|"]
    md += [f"| {name}{' (hot path)' if name == r['hot_path'] else ''} | {x['mb_per_s']:,.0f} | "
           f"{x['mb_per_s'] / c['pyarrow']['mb_per_s']:.2f} | {x['get_ms']:.1f} | {x['list_ms']:.1f} |"
           for name, x in c.items()]
    return md


if __name__ == "__main__":
    import json

    result = s3_section()
    print(json.dumps(result, indent=1))
    print("\n".join(s3_markdown(result)))
