"""Layouts, who writes which bytes, the exchange schedule and its round engine, as pure functions
(no processes: the engine runs on a fake comm)."""

import time

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dist_saver.errors import CollectiveError
from dist_saver.exchange import Chunk, Piece, Rounds, Schedule, make_schedule
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
    assert sched.chunks == [] and sched.rounds == 0  # nothing crosses the network
    assert plan.bytes_per_rank() == [18 * 400, 18 * 400, 18 * 400, 16 * 400]


def test_small_sharded_tensors_are_assembled_whole_on_their_owner_in_one_range():
    """Below small_sharded_bytes a Shard(0) tensor is not written band by band: its owner writes it
    whole from every rank's rows (the exchange), so a file's run of them is one range."""
    layout = Layout((4,), (0, 1, 2, 3), (Shard(0),))
    infos = ([TensorInfo(f"s{i}", "F32", (10, 3), 120) for i in range(6)]  # uneven: 3, 3, 3, 1 rows
             + [TensorInfo("big", "F32", (8, 64), 8 * 64 * 4)] + [TensorInfo("v", "F32", (7,), 28)])
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    plan = make_plan(infos, 4, boxes=boxes, small_sharded_bytes=1000)
    _check_tiles(plan)
    for f in plan.files:
        for e in f.extents:
            names = [s.name for s in e.segments]
            if "big" in names:  # larger than the limit: its bands in place, by their holders
                assert names == ["big"] and not e.assembled
            else:  # the owner's consecutive small tensors (1-d too): one assembled extent
                assert e.assembled and e.rank == f.rank and all(s.lo == 0 for s in e.segments)
    sched = make_schedule(plan, {i.name: i.shape for i in infos}, boxes)
    for c in sched.chunks:  # every rank's rows of the tensor, tiling it
        rows = sorted((p.offset[0], p.offset[0] + p.shape[0]) for p in c.pieces)
        assert rows[0][0] == c.rows[0] and rows[-1][1] == c.rows[1]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])) and {p.peer for p in c.pieces} == {0, 1, 2, 3}
    assert {c.key for c in sched.chunks} == {f"s{i}" for i in range(6)} | {"v"}
    in_place = make_plan(infos, 4, boxes=boxes)  # the default: every band in place
    assert not any(e.assembled for f in in_place.files for e in f.extents)


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
    chunks = sched.chunks
    assert [(c.owner, c.rows) for c in chunks] == [(0, (0, 2)), (0, (2, 4)), (1, (4, 6)), (1, (6, 8))]
    for c in chunks:
        assert [(p.peer, p.offset, p.shape) for p in c.pieces] == [
            (0, (c.rows[0], 0), (2, 5)), (1, (c.rows[0], 5), (2, 5))]
    for w in (0, 1):
        for r in range(sched.rounds):
            assert sum(c.nbytes for c in chunks if c.owner == w and c.round == r) <= 80
    remote = sum(p.nbytes for c in chunks for p in c.pieces if p.peer != c.owner)
    assert remote == 8 * 10 * 4 // 2  # each writer receives the other half of its band, once
    assert sched.rounds == 2


def test_2d_boxes_are_assembled_within_each_row_band():
    # dp=2 (rows) x tp=2 (columns): rows 0-49 on ranks 0 and 1, split by columns between them
    layout = Layout((2, 2), (0, 1, 2, 3), (Shard(0), Shard(1)))
    plan, sched, boxes = _plan((100, 8), (layout,), 4, bucket=1 << 20)
    _check_tiles(plan)
    segs = [s for e in plan.files[0].extents for s in e.segments]
    assert [(s.lo, s.hi, s.rank) for s in segs] == [(0, 25, 0), (25, 50, 1), (50, 75, 2), (75, 100, 3)]
    for c in sched.chunks:  # the pieces of a band come from its own dp row: ranks 0,1 or 2,3
        assert {p.peer for p in c.pieces} == ({0, 1} if c.rows[0] < 50 else {2, 3})
    assert plan.bytes_per_rank() == [25 * 8 * 4] * 4


def test_replicated_owner_needs_no_exchange():
    layout = Layout((2,), (0, 1), (Replicate(),))
    plan, sched, _ = _plan((8, 10), (layout,), 2, bucket=80)
    assert sched.chunks == [] and sched.rounds == 0
    assert [(e.rank, e.assembled) for e in plan.files[0].extents] == [(plan.files[0].rank, False)]


def test_buckets_bound_every_writers_round():
    layout = Layout((4,), (0, 1, 2, 3), (Shard(1),))
    infos = [TensorInfo(f"w{i}", "BF16", (96, 64), 96 * 64 * 2) for i in range(6)]
    boxes = {i.name: group_boxes(i.name, i.shape, (layout,), lambda r: r) for i in infos}
    plan = make_plan(infos, 4, boxes=boxes)
    sched = make_schedule(plan, {i.name: i.shape for i in infos}, boxes, bucket_bytes=1000)
    chunks = sched.chunks
    assert sum(c.nbytes for c in chunks) == sum(i.nbytes for i in infos)
    for w in range(4):
        mine = [c for c in chunks if c.owner == w]
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
    for c in sched.chunks:
        tiling = next(t for t in boxes["w"] if c.owner in t)
        assert {p.offset[1:] for p in c.pieces} == {b[0][1:] for b in tiling.values()}
        assert sum(p.nbytes for p in c.pieces) == c.nbytes  # each byte of the chunk from one piece


class _FakeComm:
    """rank, world_size and all_to_all_bytes, recording every call; fills the receive buffer
    with 1, 2, 3... and raises fail_at's error in that round."""

    def __init__(self, rank, world_size, fail_at=None):
        self.rank, self.world_size, self.fail_at = rank, world_size, fail_at
        self.calls = []

    def all_to_all_bytes(self, send, send_sizes, recv, recv_sizes):
        self.calls.append((bytes(send.numpy()), list(send_sizes), list(recv_sizes)))
        if len(self.calls) - 1 == self.fail_at:
            raise CollectiveError("injected: the group broke")
        recv.copy_(torch.arange(1, recv.numel() + 1, dtype=torch.uint8))


def _engine_schedule():
    """Rank 0 of 3 sends a 3-byte piece to 1 and an 8-byte one to 2 in round 0 and receives
    pieces from 2 and 1 in round 1 (gather), then takes part in a round 2 of others."""
    sched = Schedule(rounds=3)
    sched.chunks = [
        Chunk("a", 1, (0, 1), 6, (Piece(0, (0, 0), (1, 3), 3), Piece(1, (0, 3), (1, 3), 3)), 0),
        Chunk("b", 2, (0, 1), 8, (Piece(0, (0, 0), (1, 2), 8),), 0),
        Chunk("c", 0, (0, 1), 5, (Piece(2, (0, 0), (1, 2), 2), Piece(1, (0, 2), (1, 3), 3)), 1),
        Chunk("d", 1, (0, 1), 2, (Piece(2, (0, 0), (1, 2), 2),), 2),
    ]
    local = {"a": torch.tensor([[7, 8, 9]], dtype=torch.uint8), "b": torch.tensor([[1.5, -2.0]])}
    return sched, local


def test_the_round_engine_packs_aligned_by_destination_and_unpacks_by_source():
    sched, local = _engine_schedule()
    comm = _FakeComm(0, 3)
    got = []
    engine = Rounds(sched, comm, True, lambda c: (local[c.key], ((0, 0), (1, c.nbytes))),
                    lambda c, p, data: got.append((c.key, p.peer, bytes(data.numpy()))))
    engine.run()
    assert [sizes for _, sizes, _ in comm.calls] == [[0, 16, 16], [0, 0, 0], [0, 0, 0]]
    send = comm.calls[0][0]
    assert send[:3] == bytes([7, 8, 9]) and send[16:24] == local["b"].numpy().tobytes()  # 16-aligned
    assert [r for _, _, r in comm.calls] == [[0, 0, 0], [0, 16, 16], [0, 0, 0]]
    assert got == [("c", 1, bytes([1, 2, 3])), ("c", 2, bytes([17, 18]))]  # by source: 1's, then 2's
    assert engine.bytes_sent == 11 and engine.done == 3


def test_the_round_engine_enters_every_round_after_a_local_error_and_raises_it_at_the_end():
    sched, local = _engine_schedule()
    comm = _FakeComm(0, 3)
    packed = []

    def source(c):
        packed.append(c.key)
        raise RuntimeError("injected: cannot read this piece")

    engine = Rounds(sched, comm, True, source, lambda c, p, data: pytest.fail("unpacked after an error"))
    with pytest.raises(RuntimeError, match="injected: cannot read"):
        engine.run()
    assert len(comm.calls) == 3 and packed == ["a"]  # every collective, no work after the error
    assert [s for _, s, _ in comm.calls] == [[0, 16, 16], [0, 0, 0], [0, 0, 0]]  # the agreed sizes
    assert engine.bytes_sent == 0


def test_the_round_engine_stops_at_once_when_a_collective_fails():
    sched, local = _engine_schedule()
    comm = _FakeComm(0, 3, fail_at=1)

    def source(c):
        raise RuntimeError("injected: local")

    with pytest.raises(CollectiveError, match="the group broke"):
        Rounds(sched, comm, True, source, lambda c, p, data: None).run()
    assert len(comm.calls) == 2  # round 2 never entered: nobody waits in a broken group


def test_the_scatter_direction_reads_every_owned_chunk_and_sends_the_other_pieces():
    # load: rank 0 owns a chunk needed by 0 and 2 and one only it needs; rank 1 sends it a piece
    sched = Schedule(rounds=1, chunks=[
        Chunk("x", 0, (0, 2), 8, (Piece(0, (0, 0), (2, 2), 4), Piece(2, (0, 2), (2, 2), 4))),
        Chunk("y", 0, (0, 1), 2, (Piece(0, (0, 0), (1, 2), 2),)),
        Chunk("z", 1, (0, 1), 1, (Piece(0, (0, 0), (1, 1), 1),)),
    ])
    comm = _FakeComm(0, 3)
    rows = {"x": torch.arange(8, dtype=torch.uint8).view(2, 4), "y": torch.ones(1, 2, dtype=torch.uint8)}
    read, got = [], []

    def source(c):
        read.append(c.key)
        return rows[c.key], ((0, 0), tuple(rows[c.key].shape))

    Rounds(sched, comm, False, source, lambda c, p, data: got.append((c.key, bytes(data.numpy())))).run()
    assert read == ["x", "y"]
    send, send_sizes, recv_sizes = comm.calls[0]
    assert send_sizes == [0, 0, 16] and send[:4] == bytes([2, 3, 6, 7])  # columns 2-3 of both rows
    assert recv_sizes == [0, 16, 0] and got == [("z", bytes([1]))]
