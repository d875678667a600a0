"""The load plan (dist_saver/load_plan.py): pure, checked without processes or files, at 1024 ranks."""

import itertools
import math
import random

import pytest
import torch

from dist_saver import CheckpointError
from dist_saver.layout import Layout, rank_boxes
from dist_saver.load_plan import Item, Target, box_items, check, column_targets, resolve


def _apply(items, data: torch.Tensor, out: torch.Tensor, start: int) -> None:
    """What a reader does with the items: data holds the file's bytes from offset `start`."""
    flat = out.view(-1).view(torch.uint8) if out.is_contiguous() else None
    for it in items:
        raw = data[it.offset - start : it.offset - start + it.nbytes]
        if it.dst_box is None:
            flat[it.at : it.at + it.nbytes] = raw
        else:
            src = raw.view(out.dtype).view(it.src_shape)
            if it.src_box is not None:
                src = src[tuple(slice(o, o + s) for o, s in zip(*it.src_box))]
            dst = out[tuple(slice(o, o + s) for o, s in zip(*it.dst_box))] if it.dst_box[1] else out
            dst.copy_(src)


def _boxes(shape):
    for off in itertools.product(*(sorted({0, min(1, s - 1), s // 2}) for s in shape)):
        for size in itertools.product(*(sorted({1, s - o}) for s, o in zip(shape, off))):
            yield off, size


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5), (2, 3, 1, 4)])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk", [8, 40, 1 << 20])
def test_box_items_fill_every_box(shape, direct, chunk):
    t = torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape)
    start = 4096
    data = t.view(-1).view(torch.uint8)
    for off, size in _boxes(shape):
        out = torch.full(size, -1, dtype=torch.int32)
        items = box_items(start, shape, 4, off, size, direct, 0, chunk)
        _apply(items, data, out, start)
        want = t[tuple(slice(o, o + s) for o, s in zip(off, size))]
        assert torch.equal(out, want), (shape, off, size, direct, chunk)
        for it in items:
            assert start <= it.offset and it.offset + it.nbytes <= start + data.numel()
            if it.dst_box is not None:  # staged items fit the staging buffer, down to one element
                assert it.nbytes <= max(chunk, 4) or it.src_box is not None


def test_box_items_of_a_non_contiguous_target_and_a_scalar():
    t = torch.arange(60, dtype=torch.int16).reshape(6, 10)
    out = torch.zeros(10, 6, dtype=torch.int16).t()  # (6, 10), not contiguous
    _apply(box_items(0, (6, 10), 2, (0, 0), (6, 10), False, 0, 1 << 20), t.view(-1).view(torch.uint8), out, 0)
    assert torch.equal(out, t)
    s = torch.tensor(2.5, dtype=torch.float64)
    for direct in (True, False):
        out = torch.zeros((), dtype=torch.float64)
        items = box_items(100, (), 8, (), (), direct, 0, 1 << 20)
        _apply(items, s.reshape(1).view(torch.uint8), out, 100)
        assert out.item() == 2.5 and [it.nbytes for it in items] == [8]


def test_narrow_column_boxes_read_whole_rows_and_long_runs_exactly():
    # 16-byte runs: whole rows, one staged item per chunk of rows
    items = box_items(0, (100, 8), 4, (0, 4), (100, 4), True, 0, 1 << 20)
    assert len(items) == 1 and items[0].nbytes == 100 * 8 * 4 and items[0].src_box == ((0, 4), (100, 4))
    # 64 KiB runs: one direct span per row, exactly the box's bytes
    items = box_items(0, (4, 32768), 4, (0, 16384), (4, 16384), True, 0, 1 << 20)
    assert [it.nbytes for it in items] == [65536] * 4 and all(it.dst_box is None for it in items)
    assert [it.at for it in items] == [i * 65536 for i in range(4)]


def _fsdp(world):
    from torch.distributed.tensor import Shard

    return Layout((world,), tuple(range(world)), (Shard(0),))


def test_a_1024_rank_fsdp_load_reads_one_span_per_tensor_and_the_group_tiles_each_once():
    """Every rank's reads of its Shard(0) boxes (planned as that rank would): one span per tensor,
    inside the tensor; all ranks' spans together tile each tensor exactly once. (Planning time at
    this scale: benchmarks/bench_tensor_count.py.)"""
    world, n = 1024, 300
    rng = random.Random(0)
    shapes = [(rng.choice((256, 1000, 2048)), rng.choice((64, 128))) for _ in range(n)]
    layout = _fsdp(world)
    starts, pos = [], 4096
    for s in shapes:
        starts.append(pos)
        pos += 2 * math.prod(s)
    spans = [[] for _ in range(n)]
    boxes = [rank_boxes(s, layout) for s in shapes]
    for rank in range(world):
        for i, s in enumerate(shapes):
            off, size = boxes[i][rank]
            items = box_items(starts[i], s, 2, off, size, True, i, 8 << 20)
            assert len(items) <= 1 and all(it.dst_box is None and it.at == 0 for it in items)
            spans[i] += [(it.offset, it.offset + it.nbytes) for it in items]
    for i, s in enumerate(shapes):
        pos = starts[i]
        for a, b in sorted(spans[i]):
            assert a == pos, (i, a, pos)
            pos = b
        assert pos == starts[i] + 2 * math.prod(s)


def test_resolve_ties_missing_unexpected_and_checks():
    f32 = torch.float32
    wm = {"a": "f1", "b": "f1", "c": "f2"}
    aliases = {"tied": "a"}
    groups = [[Target("a", (2,), f32, None), Target("tied", (2,), f32, None)], [Target("b", (3,), f32, None)],
              [Target("x", (1,), f32, None)]]
    with pytest.raises(CheckpointError, match=r"missing \['x'\], unexpected \['c'\]"):
        resolve(wm, aliases, groups, list(wm) + list(aliases), True, "/ck")
    reads = resolve(wm, aliases, groups, list(wm) + list(aliases), False, "/ck")
    assert reads.loaded == ["a", "tied", "b"] and reads.missing == ["x"] and reads.unexpected == ["c"]
    assert set(reads.fills) == {"a", "b"} and reads.by_file == {"f1": ["a", "b"]}  # "tied" is read with "a"
    check(reads, "f1", lambda name: {"a": (f32, (2,)), "b": (f32, (3,))}[name])
    with pytest.raises(CheckpointError, match=r"tensor 'b': the model has torch.float32\[3\] but file f1 has"):
        check(reads, "f1", lambda name: {"a": (f32, (2,)), "b": (torch.float16, (3,))}[name])


def test_column_targets_are_the_boxes_split_by_columns_inside_the_group():
    from torch.distributed.tensor import Shard

    f32 = torch.float32
    tp = Layout((2,), (0, 1), (Shard(1),))
    reads = resolve({"row": "f", "col": "f", "whole": "f"}, {},
                    [[Target("row", (4, 4), f32, ((0, 0), (2, 4)))], [Target("col", (4, 4), f32, ((0, 0), (4, 2)))],
                     [Target("whole", (4, 4), f32, None)]], ["row", "col", "whole"], True, "/ck")
    layouts = {"row": _fsdp(2), "col": tp}
    assert column_targets(reads, layouts, lambda ranks: True) == {"col"}
    assert column_targets(reads, layouts, lambda ranks: False) == set()  # its mesh is not all in the group


def test_item_is_plain_data():
    it = Item(1, 2, 0, 0, None, None, None)
    assert it == (1, 2, 0, 0, None, None, None) and hash(it)
