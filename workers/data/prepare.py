"""Corpus -> tokenizer -> packed parquet shards -> manifest, in parallel over the cluster.

1. Plan (driver, before any work): list the source, check it holds text, assign files to shards
   deterministically (workers/data/sources.py). Errors here cost nothing.
2. Tokenizer: bytes, or a BPE trained on a sample; saved to the staging prefix first, so a resumed
   run reuses it instead of training another one.
3. Shards: one Ray Data task per unfinished shard (``from_items`` of shard plans ->
   ``map_batches(build_shard_batch)``); each writes its parquet and done-record itself, so nothing
   depends on ``write_parquet``'s non-atomic output. Finished shards (done-records) are skipped.
4. Commit: the manifest, listing every shard with rows, tokens and SHA-256, written last.
5. Retire: a manifest that replaces another lists the other's files as ``retired`` (a job that
   started on them keeps reading them) and deletes the files the replaced one had retired: only
   files a manifest of ours listed, with their done-records, and their folder once empty.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Protocol

import pyarrow.fs as pafs

from workers.confine import ROOTS_ENV
from workers.data.manifest import (
    SPLITS,
    CorpusError,
    FileEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
    TokenizerEntry,
    load_manifest,
    sha256_hex,
    write_manifest,
)
from workers.data.prepare_config import PrepareConfig
from workers.data.shards import build_shard, build_shard_batch, done_path, read_done
from workers.data.sources import Plan, ShardPlan, bpe_sample, list_source, make_plan, require_text
from workers.data.storage import confined, join, open_fs, read_bytes, s3_env, uri_of, write_bytes_atomic
from workers.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

TOKENIZER_FILE = "tokenizer.json"
MB = 1e6
# One thread per shard task: the BPE's ``tokenizers`` otherwise starts a thread per core in every task
# on top of Ray's task parallelism (under load, 4 MB took 91 s that way and 14 s with one thread).
TASK_THREAD_ENV = {"RAYON_NUM_THREADS": "1"}


class ShardRunner(Protocol):
    """Builds shards and yields each one's entry as it finishes (in any order)."""

    def __call__(self, shards: list[ShardPlan], *, source: str, out: str, out_rel: str,
                 tokenizer: Tokenizer, pack_len: int | None, group_bytes: int) -> Iterator[ShardEntry]: ...


def run_in_process(shards: list[ShardPlan], *, source: str, out: str, out_rel: str, tokenizer: Tokenizer,
                   pack_len: int | None, group_bytes: int) -> Iterator[ShardEntry]:
    """One shard after the other in this process (unit tests, tiny corpora)."""
    for shard in shards:
        yield build_shard(shard, source=source, out=out, out_rel=out_rel, tokenizer=tokenizer, pack_len=pack_len,
                          group_bytes=group_bytes)


def ray_runner(max_tasks: int | None = None, cpus_per_task: float = 1.0) -> ShardRunner:
    """Shards as Ray Data tasks over the connected cluster, ``max_tasks`` at once (None: as many as
    the CPUs allow). Call ``ray.init`` first."""

    def run(shards: list[ShardPlan], *, source: str, out: str, out_rel: str, tokenizer: Tokenizer,
            pack_len: int | None, group_bytes: int) -> Iterator[ShardEntry]:
        import ray.data

        if not shards:
            return
        # The S3 settings and the job's data roots reach the shard tasks through their runtime_env.
        env = {**s3_env(), **{k: os.environ[k] for k in (ROOTS_ENV,) if os.environ.get(k)}}
        items = [{"plan": json.dumps(asdict(s))} for s in shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            build_shard_batch, batch_size=1, num_cpus=cpus_per_task,
            compute=ray.data.TaskPoolStrategy(size=max_tasks),
            fn_kwargs={"source": source, "out": out, "out_rel": out_rel,
                       "tokenizer_json": tokenizer.to_json(), "pack_len": pack_len, "group_bytes": group_bytes},
            runtime_env={"env_vars": {**env, **TASK_THREAD_ENV}})
        for row in ds.iter_rows():
            yield ShardEntry.model_validate_json(row["entry"])

    return run


def _tokenizer(cfg: PrepareConfig, out_fs: pafs.FileSystem, staging: str, fs: pafs.FileSystem, root: str, plan: Plan,
               log: Callable[[str], None]) -> tuple[Tokenizer, bytes]:
    """The staged tokenizer if a previous run saved one, else a new one (saved before any shard)."""
    path = join(staging, TOKENIZER_FILE)
    if out_fs.get_file_info(path).size:
        raw = read_bytes(out_fs, path)
        log(f"prepare: reusing the {cfg.tokenizer} tokenizer in {uri_of(out_fs, path)}")
        return load_tokenizer(raw.decode()), raw
    if cfg.tokenizer == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        started = time.perf_counter()
        texts = bpe_sample(fs, root, plan, cfg.bpe_sample_bytes)
        sample_mb = sum(len(t) for t in texts) / MB
        tokenizer = train_bpe(texts, cfg.vocab_size)
        log(f"prepare: trained a {tokenizer.vocab_size}-token BPE on {sample_mb:.1f} MB "
            f"({len(texts)} files) in {time.perf_counter() - started:.1f} s")
    raw = tokenizer.to_json().encode()
    write_bytes_atomic(out_fs, path, raw)
    return tokenizer, raw


def _remove_retired(fs: pafs.FileSystem, root: str, names: set[str]) -> None:
    """Delete these files an earlier manifest listed (relative names, checked inside ``root``), each
    shard's done-record, and their folders once empty. A local file whose folder is linked out of the
    job's roots is left alone; a failure is left for the next preparation to retry."""
    folders = set()
    for name in sorted(names):
        folder = join(root, name.rsplit("/", 1)[0]) if "/" in name else root
        try:
            confined(fs, folder)
            for path in (join(root, name), done_path(folder, name.rsplit("/", 1)[-1].removesuffix(".parquet"))):
                if fs.get_file_info(path).type == pafs.FileType.File:
                    fs.delete_file(path)
        except OSError:  # OutsideRoots, or a store that refuses: the next preparation retries
            continue
        folders.add(folder)
    for folder in folders - {root}:
        try:
            if not fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                fs.delete_dir(folder)
        except OSError:
            continue


def prepare(cfg: PrepareConfig, log: Callable[[str], None] = print, runner: ShardRunner = run_in_process, *,
            origin: str = "jobs.prepare", retire: tuple[str, ...] = ()) -> Manifest:
    """Prepare ``cfg.source`` into ``cfg.path`` and return the committed manifest.

    ``origin``: who asks (the manifest's ``origin``); ``retire``: files of a manifest in an older
    format that this one replaces (workers/data/cache.py's migration), retired like the files of a
    replaced version-2 manifest.

    Idempotent: an up-to-date manifest (same fingerprint) is returned as is; an interrupted run
    resumes, building only the shards without a done-record. Raises CorpusError / StorageError
    (naming the file or bucket) before any work for a missing, empty or binary-only source.
    """
    fs, root, files, linked_out = list_source(cfg)
    require_text(fs, root, files)
    plan = make_plan(cfg, fs, root, files)
    out_fs, out_root = open_fs(cfg.path)
    existing = load_manifest(out_fs, out_root, missing_ok=True)
    if existing is not None and existing.fingerprint == plan.fingerprint:
        log(f"prepare: {uri_of(out_fs, out_root)} is up to date ({plan.fingerprint[:16]})")
        return existing

    staging = join(out_root, plan.shard_dir)
    tokenizer, tok_raw = _tokenizer(cfg, out_fs, staging, fs, root, plan, log)
    done = {s.name: e for s in plan.shards if (e := read_done(out_fs, staging, s)) is not None}
    todo = [s for s in plan.shards if s.name not in done]
    if linked_out:
        log(f"prepare: skipped {linked_out} file{'s' if linked_out > 1 else ''} linked outside the data roots")
    log(f"prepare: {len(files)} files ({plan.input_bytes / MB:.1f} MB) from {plan.source} -> "
        f"{len(plan.shards)} shards in {uri_of(out_fs, staging)} ({len(done)} already done, {len(todo)} to build)")
    started = time.perf_counter()
    in_bytes = 0
    for entry in runner(todo, source=plan.source, out=uri_of(out_fs, staging), out_rel=plan.shard_dir,
                        tokenizer=tokenizer, pack_len=cfg.pack_len, group_bytes=cfg.row_group_bytes):
        done[entry.file.rsplit("/", 1)[-1].removesuffix(".parquet")] = entry
        in_bytes += entry.input_bytes
        elapsed = time.perf_counter() - started
        log(f"prepare: {len(done)}/{len(plan.shards)} shards ({entry.file}: {entry.rows} rows, "
            f"{entry.tokens / 1e6:.2f}M tokens); {in_bytes / MB:.1f} MB in {elapsed:.1f} s, "
            f"{in_bytes / MB / max(elapsed, 1e-9):.1f} MB/s")

    missing = [s.name for s in plan.shards if s.name not in done]
    if missing:  # a runner that stops early must not commit a partial manifest
        raise CorpusError(f"prepare: shards {missing[:5]} were not built; nothing committed")
    entries = [done[s.name] for s in plan.shards]
    splits = {split: SplitEntry(rows=sum(e.rows for e in es), tokens=sum(e.tokens for e in es),
                                documents=sum(e.documents for e in es), shards=es)
              for split in SPLITS for es in [[e for e in entries if e.split == split]]}
    tok_file = FileEntry(file=f"{plan.shard_dir}/{TOKENIZER_FILE}", bytes=len(tok_raw), sha256=sha256_hex(tok_raw))
    new_files = {tok_file.file, *(e.file for e in entries)}
    in_use = set(existing.files() if existing is not None else retire)  # what a running job may still read
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=plan.source,
        fingerprint=plan.fingerprint, shard_dir=plan.shard_dir, pack_len=cfg.pack_len,
        tokenizer=TokenizerEntry(**tok_file.model_dump(), kind=tokenizer.kind, vocab_size=tokenizer.vocab_size,
                                 eos_id=tokenizer.eos_id),
        input_files=len(files), input_bytes=plan.input_bytes,
        skipped_binary=sum(e.skipped_binary for e in entries),
        skipped_links=linked_out + sum(e.skipped_links for e in entries), splits=splits,
        spec=cfg.model_dump(mode="json"), origin=origin, retired=sorted(in_use - new_files))
    if manifest.splits["train"].tokens == 0:
        raise CorpusError(f"prepare: no text in {plan.source} (skipped {manifest.skipped_binary} binary files); "
                           f"nothing committed")
    write_manifest(out_fs, out_root, manifest)
    if existing is not None:
        _remove_retired(out_fs, out_root, set(existing.retired) - new_files - in_use)
    log(f"prepare: committed {uri_of(out_fs, join(out_root, 'manifest.json'))}: "
        + ", ".join(f"{s} {manifest.splits[s].tokens / 1e6:.2f}M tokens in {len(manifest.splits[s].shards)} shards"
                    for s in SPLITS)
        + f"; skipped {manifest.skipped_binary} binary files"
        + (f", {manifest.skipped_links} linked outside the data roots" if manifest.skipped_links else ""))
    return manifest
