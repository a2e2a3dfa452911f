"""The training order and the global data position (workers/data/order.py), and one rank's stream
over real read tasks (workers/data/stream.py, reader.py): each sequence once through kills,
resizes and speed splits, each unit read by one rank, resume without reading consumed data,
row-group checksums verified by the task that reads them."""

import json

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workers.data import DataConfig, PrepareConfig, open_training_data, prepare
from workers.data.order import DataState, Plan, Unit
from workers.data.reader import CorruptUnit, UnitSource, _read_units_task, block_units, read_unit
from workers.data.stream import RankStream, state_for


def _plan(n_units=41, seed=0, seq_len=31):
    rng = np.random.default_rng(seed)
    units = [Unit(f"s{i}.parquet", 0, int(rng.integers(0, 40 * (seq_len + 1))), "0" * 64, 100) for i in range(n_units)]
    return Plan(units, seq_len)


def _ids(plan, epoch, takes, seed=5):
    return [int(plan.offsets[p.unit]) + int(i) for p in takes for i in plan.row_order(seed, epoch, p.unit)[p.lo:p.hi]]


def _split(rng, total, world):
    cuts = np.sort(rng.choice(np.arange(1, total), world - 1, replace=False)) if world > 1 else []
    return np.diff([0, *cuts, total]).tolist()  # random shares, each >= 1: a speed-aware split


@pytest.mark.parametrize("seed", range(6))
def test_every_sequence_of_an_epoch_once_through_a_kill_and_resizes_2_1_3(seed):
    """Worlds 2 -> (kill: steps after the checkpoint lost) -> 1 -> 3, random speed splits, 12 rows
    a step: the lineage that survives trains each sequence of the epoch once; fewer than a global
    batch are left when the epoch ends."""
    plan, rng = _plan(seed=seed), np.random.default_rng(seed)
    state, lineage, total = DataState(plan, 5), [], 12
    for world, steps, lost in [(2, 9, 3), (1, 7, 0), (3, 10_000, 0)]:
        saved = None
        for i in range(steps):
            if i == steps - lost:
                saved = json.loads(json.dumps(state.state_dict()))  # a checkpoint, through JSON
            epoch, rows = state.epoch, _split(rng, total, world)
            takes = state.step(rows)
            if state.epoch != epoch:
                break
            assert [len(_ids(plan, epoch, t)) for t in takes] == rows  # every rank gets its share
            if saved is None:
                lineage += [i for t in takes for i in _ids(plan, epoch, t)]
        state = DataState.restore(plan, 5, saved or state.state_dict())
        if state.epoch:
            break
    assert len(lineage) == len(set(lineage))  # none twice
    assert set(lineage) <= set(range(plan.total)) and plan.total - len(lineage) < total  # none skipped


def test_each_unit_is_read_by_one_rank_and_epochs_reshuffle():
    plan = _plan(n_units=200)
    state, readers = DataState(plan, 5), {}
    orders = []
    for _ in range(10_000):
        epoch = state.epoch
        takes = state.step([4, 4, 4, 4])
        if state.epoch != epoch or epoch:
            break
        for rank, pieces in enumerate(takes):
            for p in pieces:
                readers.setdefault(p.unit, set()).add(rank)
                orders.append(p.unit) if not orders or orders[-1] != p.unit else None
    shared = [u for u, ranks in readers.items() if len(ranks) > 1]
    assert len(shared) <= 4  # only at the epoch's end, where ranks short of rows take from others
    assert not (plan.unit_order(5, 0) == plan.unit_order(5, 1)).all()
    assert not (plan.row_order(5, 0, 3) == plan.row_order(5, 1, 3)).all()


def test_a_checkpoint_of_the_older_loop_continues_after_its_sequence_count():
    plan = _plan()
    state = DataState.after(plan, 5, epoch=0, consumed=100)
    assert state.consumed == 100 and state.remaining() == plan.total - 100
    with pytest.raises(ValueError, match="another dataset or seq_len"):
        DataState.restore(_plan(seq_len=15), 5, state.state_dict())


# ----------------------------------------------------------------------------------------------
# One rank's stream over real read tasks, on a prepared dataset in small row groups


@pytest.fixture
def small_groups(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for f in range(8):
        (src / f"m{f}.py").write_text("".join(f"v_{f}_{i} = {f * 7919 + i}\n" for i in range(60)))
    root = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(source=str(src), path=str(root), shard_bytes=4096, row_group_bytes=2048,
                                     val_fraction=0.0), log=lambda _: None)
    data = open_training_data(DataConfig(path=str(root), seq_len=15), vocab_size=256, log=lambda _: None)
    return manifest, root, data


def _reads(plan, fetched):
    """Units read here in order, as a Ray Data read yields them (the same read tasks,
    workers/data/stream.ray_reads); ``fetched`` lists the units read."""
    def reads(units):
        mode = "mark" if plan.on_corrupt == "skip" else "fail"
        for group in UnitSource(units, plan.filesystem, plan.seq_len, plan.roots, mode).groups():
            fetched.extend(u for _, u in group)
            for block in _read_units_task(plan.filesystem, group, plan.seq_len, plan.roots, mode):
                yield from block_units(block)
    return reads


def test_prepare_writes_row_groups_of_bounded_size_each_listed(small_groups):
    manifest, root, data = small_groups
    for entry in manifest.splits["train"].shards:
        meta = pq.read_metadata(root / entry.file)
        assert entry.row_groups and meta.num_row_groups == len(entry.row_groups) > 1
        assert sum(g.tokens for g in entry.row_groups) == entry.tokens
        assert all(g.tokens * 2 <= 2048 or g.rows == 1 for g in entry.row_groups)
    assert len(data.units["train"]) == sum(len(e.row_groups) for e in manifest.splits["train"].shards)


def test_a_resumed_stream_reads_no_consumed_unit_and_gets_each_row_once(small_groups):
    _, _, data = small_groups
    plan = data.plan("train", DataConfig(seq_len=15))
    first: list = []
    streams = [RankStream(plan, state_for(plan, 5, None), r, _reads(plan, first)) for r in range(2)]
    rows = {}
    for _ in range(7):
        for s in streams:
            ids, x = s.next([3, 5])
            rows.update(zip(ids.tolist(), map(bytes, x), strict=True))
    saved = {"epoch": 0, "sequences_in_epoch": 56, "data_state": streams[0].state.state_dict()}
    assert streams[1].state.state_dict() == saved["data_state"] and len(rows) == 56
    resumed: list = []
    stream = RankStream(plan, state_for(plan, 5, json.loads(json.dumps(saved))), 0, _reads(plan, resumed))
    ids, x = stream.next([8])
    pending = {plan.units[p[0]] for p in saved["data_state"]["pieces"]}
    claimed = {plan.units[u] for u in Plan(plan.units, 15).unit_order(5, 0)[:saved["data_state"]["next"]]}
    assert resumed and not set(resumed) & (claimed - pending)  # no consumed unit read
    assert not set(ids.tolist()) & set(rows)  # none trained twice
    # A sequence's id names its tokens, whoever reads it: the unit's packed rows in the epoch's order.
    order = Plan(plan.units, 15)
    for i, row in zip(ids.tolist(), x, strict=True):
        unit = int(np.searchsorted(order.offsets, i, side="right")) - 1
        packed = read_unit(plan.filesystem, plan.units[unit], 15, None)
        assert bytes(packed[i - order.offsets[unit]]) == bytes(row)


def _flip_a_row_group(root, entry, group):
    path = root / entry.file
    col = pq.read_metadata(path).row_group(group).column(1)  # tokens
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_a_corrupt_row_group_fails_its_read_task_naming_it_or_is_dropped_on_every_rank(small_groups):
    manifest, root, data = small_groups
    entry = manifest.splits["train"].shards[0]
    path = _flip_a_row_group(root, entry, 1)
    plan = data.plan("train", DataConfig(seq_len=15))
    bad = next(u for u in plan.units if u.path == str(path) and u.row_group == 1)
    with pytest.raises(CorruptUnit, match=f"shard {path} is corrupt \\(row group 1\\)"):
        read_unit(plan.filesystem, bad, 15, None)
    assert len(read_unit(plan.filesystem, plan.units[0], 15, None))  # the shard's other row groups read fine

    skip = data.plan("train", DataConfig(seq_len=15, on_corrupt="skip"))
    logs: list[str] = []
    found: list[set] = []

    def agree(units):  # one rank here: what the loop's all_gather would merge
        found.append(units)
        return units

    stream = RankStream(skip, state_for(skip, 5, None), 0, _reads(skip, []), agree, logs.append)
    seen = []
    while stream.state.epoch == 0:
        ids, _ = stream.next([4])
        seen += ids.tolist() if stream.state.epoch == 0 else []
    index = plan.units.index(bad)
    order = stream.state.plan
    assert any(f"skipping a corrupt unit: shard {path} is corrupt (row group 1)" in line for line in logs)
    assert not set(seen) & set(range(order.offsets[index], order.offsets[index + 1]))
    assert len(seen) == len(set(seen)) and order.total - int(order.counts[index]) - len(seen) < 4


def test_an_older_one_row_group_shard_is_read_whole_and_verified_as_a_file(tmp_path):
    from workers.data.manifest import sha256_hex

    path = tmp_path / "old.parquet"
    docs = [np.arange(1, 50, dtype=np.uint16), np.arange(60, 80, dtype=np.uint16)]
    import pyarrow as pa

    pq.write_table(pa.table({"tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.uint16()))}), path)
    raw = path.read_bytes()
    unit = Unit(str(path), None, 69, sha256_hex(raw), len(raw))
    rows = read_unit(pafs.LocalFileSystem(), unit, 7, None)
    assert rows.shape == (8, 8) and rows.ravel().tolist() == np.concatenate(docs)[:64].tolist()
    path.write_bytes(raw[:-1] + b"x")
    with pytest.raises(CorruptUnit, match=f"shard {path} is corrupt: its size or SHA-256"):
        read_unit(pafs.LocalFileSystem(), unit, 7, None)


@pytest.mark.ray
def test_a_ray_read_task_names_the_corrupt_row_group_in_one_line(train_ray, small_groups):
    from workers.data.stream import ray_reads

    manifest, root, data = small_groups
    path = _flip_a_row_group(root, manifest.splits["train"].shards[0], 0)
    plan = data.plan("train", DataConfig(seq_len=15))
    reads = ray_reads(plan)
    (index, rows), = list(reads([plan.units[1]]))  # the shard's other row group, through a real read task
    assert index == 0 and len(rows) > 0
    with pytest.raises(CorruptUnit) as e:
        list(reads(plan.units[:2]))
    assert str(e.value).startswith(f"shard {path} is corrupt (row group 0)") and "Traceback" not in str(e.value)
    got = dict(ray_reads(data.plan("train", DataConfig(seq_len=15, on_corrupt="skip")))(plan.units[:2]))
    assert got[0].startswith(f"shard {path} is corrupt (row group 0)") and len(got[1]) > 0


@pytest.mark.ray
def test_a_ranks_epoch_is_one_ray_data_execution_and_leaves_no_thread_behind(train_ray, small_groups):
    """An execution costs ~100 ms to start and Ray keeps its stats and metric series (its
    _StatsActor and dashboard agent grew ~1.1 MiB per execution): a rank's epoch was one execution
    per unit. Ray 2.60's batch iterator also left a thread per execution that never ended."""
    import threading

    import ray
    from ray.data._internal.stats import get_or_create_stats_actor

    from workers.data.stream import ray_reads

    _, _, data = small_groups
    plan = data.plan("train", DataConfig(seq_len=15))
    stats = get_or_create_stats_actor()
    reads = ray_reads(plan)
    list(reads(plan.units[:1]))  # Ray Data's own threads, started once
    threads, executions = threading.active_count(), len(ray.get(stats.get_datasets.remote()))
    stream = RankStream(plan, state_for(plan, 5, None), 0, reads)
    ids = []
    while stream.state.epoch == 0 and stream.state.remaining() >= 8:
        ids += stream.next([8])[0].tolist()
    read = reads(plan.units)  # a read left before its end: shut down, its tasks cancelled
    next(read)
    read.close()
    stream.close()
    order = stream.state.plan
    assert len(ids) == len(set(ids)) and order.total - len(ids) < 8
    assert stream.units_read == int((order.counts > 0).sum()) == 8  # each unit read once
    assert len(ray.get(stats.get_datasets.remote())) - executions == 2 == stream.executions + 1
    assert threading.active_count() == threads


def test_a_rank_reads_ahead_the_units_it_will_take_and_a_changing_split_only_restarts_its_read(small_groups, monkeypatch):
    """A speed split swinging between the ranks at every step: the ranks still get each sequence
    once; a rank whose units differ from what it read ahead starts a new read from its position
    (read tasks of two units here: a dropped read wastes at most the rest of its task)."""
    import workers.data.reader as reader

    _, _, data = small_groups
    monkeypatch.setattr(reader, "READ_TASK_BYTES", 2 * 2 * max(u.tokens for u in data.units["train"]))
    plan = data.plan("train", DataConfig(seq_len=15))
    rng, fetched = np.random.default_rng(1), [[], []]
    streams = [RankStream(plan, state_for(plan, 5, None), r, _reads(plan, fetched[r])) for r in range(2)]
    seen = []
    while streams[0].state.epoch == 0 and streams[0].state.remaining() >= 12:
        rows = [1, 11] if rng.random() < 0.5 else [11, 1]
        seen += [i for s in streams for i in s.next(rows)[0].tolist()]
    order = streams[0].state.plan
    assert len(seen) == len(set(seen)) and order.total - len(seen) < 12
    assert all(s.executions > 1 for s in streams)
    assert len(fetched[0]) + len(fetched[1]) <= len(plan.units) + 2 * sum(s.executions for s in streams)


@pytest.mark.parametrize("seed", range(4))
def test_the_units_a_rank_will_take_are_those_stepping_finds(seed):
    """``upcoming`` jumps over the steps in which no piece ends: the same units, in the same order,
    as stepping one by one, to the epoch's end, after a resize and with pieces from a checkpoint."""
    plan, rng = _plan(n_units=60, seed=seed), np.random.default_rng(seed)
    state = DataState(plan, 5)
    for _ in range(int(rng.integers(0, 30))):
        state.step(_split(rng, 9, 3))
    state = DataState.restore(plan, 5, state.state_dict())
    rows = _split(rng, 7, 2)
    for rank in range(2):
        sim, want = state.copy(), []
        held = {p.unit for p in sim.held[rank]} if len(sim.held) == 2 else set()
        while sim.remaining() >= sum(rows):
            for p in [*sim.step(rows)[rank], *sim.held[rank]]:
                if p.unit not in held and p.unit not in want:
                    want.append(p.unit)
        assert state.upcoming(rank, rows, claims=10_000) == want and len(want) > 5
    assert len(state.upcoming(0, rows, claims=4)) <= 4 + 2


def test_a_copy_steps_into_the_next_epoch_without_moving_the_original():
    plan = Plan([Unit(f"s{i}", 0, 129 * 4, "x", 1) for i in range(5)], 128)  # 5 units of 4 sequences
    state = DataState(plan, seed=3)
    state.step([8, 8])
    trial = state.copy()
    trial.step([8, 8])  # the epoch's last 4 sequences and then the next epoch's
    assert trial.epoch == 1 and state.epoch == 0 and state.remaining() == 4
    fresh = DataState(plan, seed=3)
    fresh.step([8, 8])
    assert state.step([2, 2]) == fresh.step([2, 2])  # the original's order is its epoch's, untouched
