"""Read tasks of a few units each (workers/data/reader.py ``UnitSource``, ``block_units``) and the
stream's in-place step (workers/data/stream.py ``RankStream._within_heads``): the same rows, ids
and position as one task per unit and the whole step."""

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

import workers.data.reader as reader
from workers.data import DataConfig
from workers.data.order import DataState, Plan, Unit
from workers.data.reader import UnitSource, _read_units_task, block_units, read_unit
from workers.data.stream import RankStream, TrainPlan, state_for

from . import test_data_order

small_groups = test_data_order.small_groups  # a prepared dataset in small row groups (a fixture)
_flip_a_row_group = test_data_order._flip_a_row_group


def test_read_tasks_take_the_first_unit_alone_then_consecutive_units_up_to_the_task_bytes():
    units = [Unit(f"s{i}", 0, tokens, "0" * 64, 1) for i, tokens in enumerate([5, 3, 3, 3, 9, 1, 20])]
    source = UnitSource(units, pafs.LocalFileSystem(), 7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "READ_TASK_BYTES", 2 * 10)  # 10 tokens a task
        groups = [[i for i, _ in g] for g in source.groups()]
        tasks = source.get_read_tasks(parallelism=len(units))
    assert groups == [[0], [1, 2, 3], [4, 5], [6]]  # a unit larger than a task: a task of its own
    assert len(tasks) == 4 and [t.metadata.size_bytes for t in tasks] == [10, 18, 20, 40]


def test_a_task_of_several_units_yields_each_units_rows_in_order_and_marks_a_corrupt_one(small_groups):
    manifest, root, data = small_groups
    plan = data.plan("train", DataConfig(seq_len=15))
    units = [u for u in plan.units if u.path == plan.units[0].path][:3]
    assert len(units) == 3 and all(u.row_group is not None for u in units)
    group = list(enumerate(units))
    (block,) = _read_units_task(plan.filesystem, group, 15, None, "fail")
    got = block_units(block)
    assert [i for i, _ in got] == [0, 1, 2]
    for (_, rows), unit in zip(got, units, strict=True):
        assert np.array_equal(rows, read_unit(plan.filesystem, unit, 15, None))
    path = _flip_a_row_group(root, manifest.splits["train"].shards[0], units[1].row_group)
    (block,) = _read_units_task(plan.filesystem, group, 15, None, "mark")
    got = dict(block_units(block))
    assert got[1].startswith(f"shard {path} is corrupt (row group {units[1].row_group})")
    assert np.array_equal(got[0], read_unit(plan.filesystem, units[0], 15, None)) and len(got[2]) > 0
    (block,) = _read_units_task(plan.filesystem, group[1:2], 15, None, "mark")  # a block of the corrupt unit only
    assert block_units(block) == [(1, got[1])]
    assert not list(_read_units_task(plan.filesystem, group[1:2], 15, None, "drop"))  # the held-out split's skip
    with pytest.raises(reader.CorruptUnit, match=f"shard {path} is corrupt"):
        list(_read_units_task(plan.filesystem, group, 15, None, "fail"))


class _Memory:
    """Reads from memory: each unit's rows, as a read of the stream's lists yields them."""

    def __init__(self, plan):
        self.rows = {u: np.arange(u.sequences(plan.seq_len) * (plan.seq_len + 1), dtype=np.uint16)
                     .reshape(-1, plan.seq_len + 1) + i for i, u in enumerate(plan.units)}

    def __call__(self, units):
        it = ((i, self.rows[u]) for i, u in enumerate(units))

        class Read:
            def __iter__(self):
                return self

            def __next__(self):
                return next(it)

            def close(self):
                pass

        return Read()


@pytest.mark.parametrize("seed", range(3))
def test_a_streams_steps_are_the_global_positions_steps_whatever_path_they_take(seed, monkeypatch):
    """Steps inside the head pieces are taken in place, the rest through ``DataState.step``: the
    rank's ids, rows and position after every step equal a plain ``DataState`` stepped beside it,
    through speed splits, a resize, a checkpoint and an epoch's end."""
    rng = np.random.default_rng(seed)
    units = [Unit(f"s{i}", 0, int(rng.integers(0, 60 * 8)), "0" * 64, 1) for i in range(30)]
    plan = TrainPlan(units, pafs.LocalFileSystem(), 7)
    order = Plan(units, 7)
    memory = _Memory(plan)
    state, inside = DataState(order, 5), []
    in_place = RankStream._within_heads
    monkeypatch.setattr(RankStream, "_within_heads", lambda self, rows: inside.append(in_place(self, rows)) or inside[-1])
    for world, steps in [(2, 60), (3, 200)]:
        saved = json.loads(json.dumps({"epoch": state.epoch, "sequences_in_epoch": state.consumed,
                                       "data_state": state.state_dict()}))
        streams = [RankStream(plan, state_for(plan, 5, saved), r, memory) for r in range(world)]
        for _ in range(steps):
            rows = [int(n) for n in rng.integers(1, 6, world)] if rng.random() < 0.3 else [3] * world
            epoch = state.epoch
            takes = state.step(rows)
            for r, stream in enumerate(streams):
                ids, x = stream.next(rows)
                want = [order.offsets[p.unit] + order.row_order(5, state.epoch, p.unit)[p.lo:p.hi] for p in takes[r]]
                assert ids.tolist() == np.concatenate(want).tolist()
                unit = np.searchsorted(order.offsets, ids, side="right") - 1
                assert np.array_equal(x, np.stack([memory.rows[units[u]][i - order.offsets[u]]
                                                   for u, i in zip(unit, ids, strict=True)]))
                assert stream.state.state_dict() == state.state_dict() and stream.state.epoch == state.epoch
            assert state.epoch >= epoch
    taken = sum(x is not None for x in inside)
    assert state.epoch >= 1 and 50 < taken < len(inside) - 50  # both paths taken, and an epoch ended
