"""Layouts, who writes which bytes, and the exchange schedule, as pure functions (no processes)."""

import time

import pytest
from torch.distributed.tensor import Replicate, Shard

from dist_saver.exchange import make_schedule
from dist_saver.layout import Layout, check_tiling, group_boxes, merged, rank_boxes
from dist_saver.format import nbytes
from dist_saver.plan import TensorInfo, make_plan
from dist_saver.torch_compat import strided_shard_type

StridedShard = strided_shard_type()


def test_boxes_fsdp_uneven_and_2d_strided():
    fsdp = Layout((4,), (0, 1, 2, 3), (Shard(0),))  # torch.chunk sizes: 18, 18, 18, 16
    assert rank_boxes((70, 10), fsdp) == {
        0: ((0, 0), (18, 10)), 1: ((18, 0), (18, 10)), 2: ((36, 0), (18, 10)), 3: ((54, 0), (16, 10))}
    tp_cols = Layout((2,), (0, 1), (Shard(1),))
    assert rank_boxes((4, 100), tp_cols) == {0: ((0, 0), (4, 50)), 1: ((0, 50), (4, 50))}
    if StridedShard is not None:
        # FSDP over tensor parallel on the same dim: TP halves first, then FSDP splits each half
        two_d = Layout((2, 2), (0, 1, 2, 3), (StridedShard(0, split_factor=2), Shard(0)))
        boxes = rank_boxes((100, 8), two_d)
        assert boxes == {0: ((0, 0), (25, 8)), 2: ((25, 0), (25, 8)), 1: ((50, 0), (25, 8)), 3: ((75, 0), (25, 8))}
        check_tiling("w", (100, 8), two_d, boxes)


@pytest.mark.skipif(StridedShard is None, reason="no _StridedShard in this torch")
def test_a_layout_whose_pieces_are_not_boxes_is_refused():
    interleaved = Layout((2,), (0, 1), (StridedShard(0, split_factor=2),))  # rows 0-24 + 50-74 on rank 0
    with pytest.raises(ValueError, match=r"'w' .* not boxes that tile"):
        check_tiling("w", (100, 8), interleaved, rank_boxes((100, 8), interleaved))


def _plan(shape, layouts, world, bucket=1 << 20, dtype="F32", max_shard_size=None):
    boxes = {"w": group_boxes("w", shape, layouts, lambda r: r)}
    plan = make_plan([TensorInfo("w", dtype, shape, nbytes(shape, dtype))], world, max_shard_size, boxes=boxes)
    return plan, make_schedule(plan, {"w": shape}, boxes, bucket), boxes


def _check_tiles(plan):
    """Every file's extents tile its data exactly, in order."""
    for f in plan.files:
        pos = 0
        for e in f.extents:
            assert e.begin == pos and e.end > e.begin
            assert e.begin == e.segments[0].begin and e.end == e.segments[-1].end
            pos = e.end
        assert pos == f.data_size


def test_row_shards_are_written_in_place_by_their_holders():
    layout = Layout((4,), (0, 1, 2, 3), (Shard(0),))  # FSDP2, uneven: 18, 18, 18, 16 rows
    plan, sched, boxes = _plan((70, 100), (layout,), 4)
    _check_tiles(plan)
    extents = plan.files[0].extents
    assert [(e.rank, e.assembled) for e in extents] == [(0, False), (1, False), (2, False), (3, False)]
    assert [e.end - e.begin for e in extents] == [18 * 400, 18 * 400, 18 * 400, 16 * 400]
    assert sched.chunks == {} and sched.rounds == 0  # nothing crosses the network
    assert plan.bytes_per_rank() == [18 * 400, 18 * 400, 18 * 400, 16 * 400]


def test_replicated_row_shards_are_written_once_spread_over_the_replicas_hsdp():
    # HSDP: replicate over 2 groups, shard over 2 ranks in each (rows 0-31 on ranks 0 and 2)
    layout = Layout((2, 2), (0, 1, 2, 3), (Replicate(), Shard(0)))
    infos = [TensorInfo(f"w{i}", "F32", (64, 16), 64 * 16 * 4) for i in range(4)]
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    plan = make_plan(infos, 4, boxes=boxes)
    _check_tiles(plan)
    for f in plan.files:
        for e in f.extents:
            for s in e.segments:  # each band written by one of the ranks holding it, once
                assert merged(boxes[s.name])[s.rank][0][0] == s.lo and not s.assembled
    assert plan.bytes_per_rank() == [2 * 32 * 16 * 4] * 4  # each replica writes half of its rows
    assert make_schedule(plan, {i.name: i.shape for i in infos}, boxes).rounds == 0


def test_column_shards_are_assembled_in_bands_spread_over_the_holders():
    layout = Layout((2,), (0, 1), (Shard(1),))  # rowwise TP: each rank holds 5 of 10 columns
    plan, sched, _ = _plan((8, 10), (layout,), 2, bucket=80)  # two rows per chunk
    _check_tiles(plan)
    segs = [s for e in plan.files[0].extents for s in e.segments]
    assert [(s.lo, s.hi, s.rank, s.assembled) for s in segs] == [(0, 4, 0, True), (4, 8, 1, True)]
    chunks = [c for cs in sched.chunks.values() for c in cs]
    assert [(c.writer, c.rows) for c in chunks] == [(0, (0, 2)), (0, (2, 4)), (1, (4, 6)), (1, (6, 8))]
    for c in chunks:
        assert [(p.src, p.offset, p.shape) for p in c.pieces] == [
            (0, (c.rows[0], 0), (2, 5)), (1, (c.rows[0], 5), (2, 5))]
    for w in (0, 1):
        for r in range(sched.rounds):
            assert sum(c.nbytes for c in chunks if c.writer == w and c.round == r) <= 80
    remote = sum(p.nbytes for c in chunks for p in c.pieces if p.src != c.writer)
    assert remote == 8 * 10 * 4 // 2  # each writer receives the other half of its band, once
    assert sched.rounds == 2


def test_2d_boxes_are_assembled_within_each_row_band():
    # dp=2 (rows) x tp=2 (columns): rows 0-49 on ranks 0 and 1, split by columns between them
    layout = Layout((2, 2), (0, 1, 2, 3), (Shard(0), Shard(1)))
    plan, sched, boxes = _plan((100, 8), (layout,), 4, bucket=1 << 20)
    _check_tiles(plan)
    segs = [s for e in plan.files[0].extents for s in e.segments]
    assert [(s.lo, s.hi, s.rank) for s in segs] == [(0, 25, 0), (25, 50, 1), (50, 75, 2), (75, 100, 3)]
    for cs in sched.chunks.values():
        for c in cs:  # the pieces of a band come from its own dp row: ranks 0,1 or 2,3
            assert {p.src for p in c.pieces} == ({0, 1} if c.rows[0] < 50 else {2, 3})
    assert plan.bytes_per_rank() == [25 * 8 * 4] * 4


def test_replicated_owner_needs_no_exchange():
    layout = Layout((2,), (0, 1), (Replicate(),))
    plan, sched, _ = _plan((8, 10), (layout,), 2, bucket=80)
    assert sched.chunks == {} and sched.rounds == 0
    assert [(e.rank, e.assembled) for e in plan.files[0].extents] == [(plan.files[0].rank, False)]


def test_buckets_bound_every_writers_round():
    layout = Layout((4,), (0, 1, 2, 3), (Shard(1),))
    infos = [TensorInfo(f"w{i}", "BF16", (96, 64), 96 * 64 * 2) for i in range(6)]
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    plan = make_plan(infos, 4, boxes=boxes)
    sched = make_schedule(plan, {i.name: i.shape for i in infos}, boxes, bucket_bytes=1000)
    chunks = [c for cs in sched.chunks.values() for c in cs]
    assert sum(c.nbytes for c in chunks) == sum(i.nbytes for i in infos)
    for w in range(4):
        mine = [c for c in chunks if c.writer == w]
        assert mine, "every rank assembles some bands"
        for r in range(sched.rounds):
            assert sum(c.nbytes for c in mine if c.round == r) <= 1000
        assert [c.round for c in mine] == sorted(c.round for c in mine), "rounds follow the write order"


def test_many_files_and_max_shard_size_keep_tiles():
    layout = Layout((3,), (0, 1, 2), (Shard(0),))
    infos = [TensorInfo(f"w{i}", "F32", (30 + i, 7), (30 + i) * 7 * 4) for i in range(9)]
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    plan = make_plan(infos, 3, max_shard_size=3000, boxes=boxes)
    _check_tiles(plan)
    assert len(plan.files) > 3
    total = sum(i.nbytes for i in infos)
    assert sum(plan.bytes_per_rank()) == total and max(plan.bytes_per_rank()) < total / 3 * 1.1


def test_fsdp_plan_at_1024_ranks_is_fast():
    layout = Layout((1024,), tuple(range(1024)), (Shard(0),))
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (4096,)]
    infos = [TensorInfo(f"l{i}.w{j}", "BF16", s, 2 * s[0] * (s[1] if len(s) > 1 else 1))
             for i in range(16) for j, s in enumerate(shapes)]
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    t0 = time.process_time()
    plan = make_plan(infos, 1024, boxes=boxes)
    sched = make_schedule(plan, {i.name: i.shape for i in infos}, boxes)
    elapsed = time.process_time() - t0
    assert elapsed < 2.0, f"planning took {elapsed:.2f}s of CPU"
    assert sched.rounds == 0
    _check_tiles(plan)
    held = [0] * 1024  # each rank writes exactly the bytes it holds
    for i in infos:
        for r, (_, shp) in merged(boxes[i.name]).items():
            held[r] += i.nbytes // i.shape[0] * shp[0]
    assert plan.bytes_per_rank() == held


def test_mesh_outside_the_group_is_an_error():
    layout = Layout((2,), (4, 5), (Shard(0),))
    with pytest.raises(ValueError, match=r"'w' is sharded over global ranks \[4, 5\]"):
        group_boxes("w", (8,), (layout,), lambda r: -1)


def test_replica_groups_that_cut_a_tensor_differently_take_pieces_from_one_tiling():
    # columns split 2 ways on ranks 0-1 and 4 ways on ranks 2-5: never mix the two tilings
    two = Layout((2,), (0, 1), (Shard(1),))
    four = Layout((4,), (2, 3, 4, 5), (Shard(1),))
    plan, sched, boxes = _plan((8, 8), (two, four), 6)
    _check_tiles(plan)
    for c in (c for cs in sched.chunks.values() for c in cs):
        tiling = next(t for t in boxes["w"] if c.writer in t)
        assert {p.offset[1:] for p in c.pieces} == {b[0][1:] for b in tiling.values()}
        assert sum(p.nbytes for p in c.pieces) == c.nbytes  # each byte of the chunk from one piece
