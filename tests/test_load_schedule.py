"""The load exchange's schedule (pure): who reads which rows of a column-split tensor, what it sends."""

import time

from torch.distributed.tensor import Replicate, Shard

from dist_saver.layout import Layout
from dist_saver.format import nbytes
from dist_saver.load_exchange import ColumnRead, make_schedule


def _read(name, shape, layout, dtype="BF16"):
    return ColumnRead((0, name), "model.safetensors", shape, dtype, layout)


def _rowwise(ranks):  # TP Shard(1) over the ranks
    return Layout((len(ranks),), tuple(ranks), (Shard(1),))


def _check(sched, reads, bucket):
    for key, descs in reads.items():
        d = descs[0]
        chunks = [c for c in sched.chunks if c.key == key]
        rows = sorted(c.rows for c in chunks)
        assert rows[0][0] == 0 and rows[-1][1] == d.shape[0]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), "every row read exactly once"
        row = nbytes(d.shape[1:], d.dtype)
        assert all(c.nbytes == (c.rows[1] - c.rows[0]) * row for c in chunks)
        assert all(c.nbytes <= max(bucket, row) for c in chunks)
        # every rank's box is delivered exactly: its pieces tile it
        for r, (off, shp) in sched.boxes[key].items():
            got = sum(p.nbytes for c in chunks for p in c.pieces if p.peer == r)
            assert got == nbytes(shp, d.dtype), f"rank {r} gets {got} bytes of its box {shp}"
    for k in range(sched.rounds):  # a reader's chunks in one round fit its bucket
        per: dict[int, int] = {}
        for c in sched.chunks:
            if c.round == k:
                per[c.owner] = per.get(c.owner, 0) + c.nbytes
        assert all(n <= bucket or len([c for c in sched.chunks if c.round == k and c.owner == r]) == 1
                   for r, n in per.items())


def test_rowwise_tp_rows_read_once_and_spread_over_the_ranks():
    layout = _rowwise(range(4))
    reads = {(0, f"w{i}"): (_read(f"w{i}", (1000, 64), layout),) for i in range(6)}
    bucket = 32 << 10
    sched = make_schedule(reads, lambda r: r, bucket)
    _check(sched, reads, bucket)
    load = {r: sum(c.nbytes for c in sched.chunks if c.owner == r) for r in range(4)}
    assert max(load.values()) - min(load.values()) <= 2 * 64 * 2, load  # within a row of even
    # every reader sends each other rank its columns of the rows it read
    c = sched.chunks[0]
    assert sorted(p.peer for p in c.pieces) == [0, 1, 2, 3]
    assert all(p.offset[0] == c.rows[0] and p.shape[0] == c.rows[1] - c.rows[0] for p in c.pieces)


def test_two_replica_groups_each_get_their_pieces_from_one_read():
    # HSDP-like: two groups of 2 ranks, each its own rowwise split: a row is read once for all 4
    a, b = _rowwise((0, 1)), _rowwise((2, 3))
    reads = {(0, "w"): (_read("w", (64, 30), a), _read("w", (64, 30), b))}
    sched = make_schedule(reads, lambda r: r, 1 << 20)
    _check(sched, reads, 1 << 20)
    assert sum(c.nbytes for c in sched.chunks) == 64 * 30 * 2


def test_2d_boxes_and_a_subgroup_mapping():
    # dp x tp = 2 x 2 on global ranks 4..7; the load's group ranks are 0..3
    layout = Layout((2, 2), (4, 5, 6, 7), (Shard(0), Shard(1)))
    reads = {(1, "w"): (_read("w", (99, 37), layout, "F32"),)}
    sched = make_schedule(reads, lambda r: r - 4, 4096)
    assert set(sched.boxes[(1, "w")]) == {0, 1, 2, 3}
    for c in sched.chunks:  # a row band of one dp half is read by one of the two ranks needing it
        need = {p.peer for p in c.pieces}
        assert c.owner in need and len(need) == 2
    assert sum(c.nbytes for c in sched.chunks) == 99 * 37 * 4


def test_replicated_dims_and_empty_boxes():
    # more ranks than columns: some ranks hold empty boxes and get nothing
    layout = Layout((2, 4), tuple(range(8)), (Replicate(), Shard(1)))
    reads = {(0, "w"): (_read("w", (16, 3), layout),)}
    sched = make_schedule(reads, lambda r: r, 1 << 20)
    dsts = {p.peer for c in sched.chunks for p in c.pieces}
    empty = {r for r, (_, shp) in sched.boxes[(0, "w")].items() if 0 in shp}
    assert empty and not (dsts & empty)
    assert sum(c.nbytes for c in sched.chunks) == 16 * 3 * 2


def test_a_schedule_for_1024_ranks_is_fast():
    # 2-D at scale: FSDP over 128 x TP over 8 (Shard(0), Shard(1)), a Llama layer's rowwise weights
    layout = Layout((128, 8), tuple(range(1024)), (Shard(0), Shard(1)))
    reads = {(0, f"w{i}"): (_read(f"w{i}", (8192, 8192), layout),) for i in range(64)}
    t0 = time.process_time()
    sched = make_schedule(reads, lambda r: r)
    assert time.process_time() - t0 < 20.0  # ~5 s here (524k pieces); a step quadratic in the ranks takes hours
    assert sum(c.nbytes for c in sched.chunks) == 64 * 8192 * 8192 * 2
    load = [0] * 1024
    for c in sched.chunks:
        load[c.owner] += c.nbytes
    assert max(load) == min(load)  # every rank reads 1/1024 of the bytes
