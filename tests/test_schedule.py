"""Layouts and the exchange schedule, as pure functions (no processes)."""

import pytest
from torch.distributed.tensor import Replicate, Shard

from dist_saver.exchange import make_schedule
from dist_saver.layout import Layout, check_tiling, rank_boxes
from dist_saver.plan import TensorInfo, make_plan

try:
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = None


def test_boxes_fsdp_uneven_and_2d_strided():
    fsdp = Layout((4,), (0, 1, 2, 3), (Shard(0),))  # torch.chunk sizes: 18, 18, 18, 16
    assert rank_boxes((70, 10), fsdp) == {
        0: ((0, 0), (18, 10)), 1: ((18, 0), (18, 10)), 2: ((36, 0), (18, 10)), 3: ((54, 0), (16, 10))}
    tp_cols = Layout((2,), (0, 1), (Shard(1),))
    assert rank_boxes((4, 100), tp_cols) == {0: ((0, 0), (4, 50)), 1: ((0, 50), (4, 50))}
    if _StridedShard is not None:
        # FSDP over tensor parallel on the same dim: TP halves first, then FSDP splits each half
        two_d = Layout((2, 2), (0, 1, 2, 3), (_StridedShard(0, split_factor=2), Shard(0)))
        boxes = rank_boxes((100, 8), two_d)
        assert boxes == {0: ((0, 0), (25, 8)), 2: ((25, 0), (25, 8)), 1: ((50, 0), (25, 8)), 3: ((75, 0), (25, 8))}
        check_tiling("w", (100, 8), two_d, boxes)


@pytest.mark.skipif(_StridedShard is None, reason="no _StridedShard in this torch")
def test_a_layout_whose_pieces_are_not_boxes_is_refused():
    interleaved = Layout((2,), (0, 1), (_StridedShard(0, split_factor=2),))  # rows 0-24 + 50-74 on rank 0
    with pytest.raises(ValueError, match=r"'w' .* not boxes that tile"):
        check_tiling("w", (100, 8), interleaved, rank_boxes((100, 8), interleaved))


def _schedule(shape, layout, world, bucket, dtype="F32"):
    n = 4
    for s in shape:
        n *= s
    plan = make_plan([TensorInfo("w", dtype, shape, n)], world)
    return plan, make_schedule(plan, {"w": shape}, {"w": (layout,)}, lambda r: r, bucket)


def test_each_byte_crosses_once_and_chunks_respect_the_bucket():
    layout = Layout((4,), (0, 1, 2, 3), (Shard(0),))
    plan, sched = _schedule((70, 100), layout, 4, bucket=4000)
    owner = plan.files[0].rank
    chunks = sched.chunks["w"]
    assert all(c.nbytes <= 4000 for c in chunks)
    assert sum(c.nbytes for c in chunks) == 70 * 100 * 4
    # chunks never straddle a shard, so each is a single piece from one rank
    assert all(len(c.pieces) == 1 for c in chunks)
    remote = sum(p.nbytes for c in chunks for p in c.pieces if p.src != owner)
    assert remote == (70 - 18) * 100 * 4  # everything but the owner's own 18 rows, once
    rounds = sorted({c.round for c in chunks})
    assert rounds == list(range(sched.rounds))
    for r in rounds:
        assert sum(c.nbytes for c in chunks if c.round == r) <= 4000


def test_replicated_pieces_are_sent_once_hsdp():
    # HSDP: replicate over 2 groups, shard over 2 ranks in each
    layout = Layout((2, 2), (0, 1, 2, 3), (Replicate(), Shard(0)))
    plan, sched = _schedule((64, 16), layout, 4, bucket=1 << 20)
    owner = plan.files[0].rank
    chunks = sched.chunks["w"]
    covered = sum(p.nbytes for c in chunks for p in c.pieces)
    assert covered == 64 * 16 * 4  # each row once, though two ranks hold it
    assert sum(p.nbytes for c in chunks for p in c.pieces if p.src == owner) == 32 * 16 * 4


def test_column_shards_are_assembled_from_both_ranks():
    layout = Layout((2,), (0, 1), (Shard(1),))
    plan, sched = _schedule((8, 10), layout, 2, bucket=80)  # two rows per chunk
    chunks = sched.chunks["w"]
    assert [c.rows for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for c in chunks:
        assert [(p.src, p.offset, p.shape) for p in c.pieces] == [
            (0, (c.rows[0], 0), (2, 5)), (1, (c.rows[0], 5), (2, 5))]


def test_replicated_owner_needs_no_exchange():
    layout = Layout((2,), (0, 1), (Replicate(),))
    _, sched = _schedule((8, 10), layout, 2, bucket=80)
    assert sched.chunks == {} and sched.rounds == 0


def test_mesh_outside_the_group_is_an_error():
    layout = Layout((2,), (4, 5), (Shard(0),))
    plan = make_plan([TensorInfo("w", "F32", (8,), 32)], 2)
    with pytest.raises(ValueError, match=r"'w' is sharded over global ranks \[4, 5\]"):
        make_schedule(plan, {"w": (8,)}, {"w": (layout,)}, lambda r: -1, 1 << 20)
