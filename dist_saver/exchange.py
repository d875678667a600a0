"""Moving shard bytes between ranks, for the save and the load: one schedule, one round engine.

Save: the plan writes every band that some rank holds whole (Shard(0) pieces, replicated tensors)
in place, from that rank's memory: those bytes never cross the network. A band split by columns
(rowwise TP, 2-D) has a writer among the ranks holding its pieces, and a small sharded tensor is
assembled whole on its owner from every rank's rows (plan.SMALL_SHARDED_BYTES); either is cut into row chunks of at
most the bucket size, and each chunk needs one piece from every distinct box overlapping it
(replicated boxes are sent once, by one holder). Every round, each writer receives its next bucket
of chunks from all ranks in one all_to_all and assembles them straight into the writer's buffers,
in file order.

Load (load_exchange): the same machinery in reverse: a chunk's owner reads its rows once and sends
each rank needing them its column piece.

So a Chunk has an `owner` (the rank that assembles and writes it, or reads it) and its Pieces a
`peer` (the rank that sends the piece to the owner, or receives it from the owner). Every rank
derives the same schedule, so no sizes travel; Rounds runs it: each round packs this rank's
outgoing pieces into one send buffer, runs one all_to_all and unpacks the incoming pieces.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from . import format as fmt
from .errors import CollectiveError
from .layout import Box, Tiling, is_nonempty
from .format import nbytes
from .plan import Plan, Segment

DEFAULT_BUCKET_BYTES = 16 << 20  # small rounds pipeline best with the writes (0.69x -> 0.86x of raw O_DIRECT, FSDP2 on 2 ranks)
_PIECE_ALIGN = 16  # pieces start at this alignment in the send/receive buffers, for any dtype's view


class Piece(NamedTuple):
    """The part of a chunk that one rank holds (save) or needs (load)."""

    peer: int  # group rank that sends it to the chunk's owner (save) or receives it from the owner (load)
    offset: tuple[int, ...]  # in the global tensor
    shape: tuple[int, ...]
    nbytes: int


class Chunk(NamedTuple):
    """Rows [rows[0], rows[1]) of one tensor, moved in one round."""

    key: object  # the tensor: its name (save) or (part, stored name) (load)
    owner: int  # group rank that assembles and writes it (save) or reads it (load)
    rows: tuple[int, int]  # [begin, end) along dim 0 of the global tensor
    nbytes: int
    pieces: tuple[Piece, ...]  # tile the chunk (save) or each rank's box within its rows (load)
    round: int = 0


@dataclass
class Schedule:
    chunks: list[Chunk] = field(default_factory=list)  # in the order every rank walks them
    rounds: int = 0
    boxes: dict = field(default_factory=dict)  # load: key -> group rank -> its box (empty for a save)

    def senders(self) -> set[tuple[object, int]]:
        """Save: (tensor, group rank) pairs: which ranks send pieces of which tensors."""
        return {(c.key, p.peer) for c in self.chunks for p in c.pieces}


def make_schedule(
    plan: Plan,
    shapes: Mapping[str, tuple[int, ...]],
    boxes: Mapping[str, Tiling],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Schedule:
    """Pure: the chunks and rounds of every assembled segment of the plan.

    Each writer's chunks are numbered into rounds in the order it writes them (plan.write_order),
    at most bucket_bytes per writer per round (a single row larger than that is one chunk). A
    chunk's pieces come from one layout's tiling, the writer's own (layouts of different replica
    groups may cut the tensor differently); any rank holding the same box may send a piece.
    A segment's chunks are consecutive in sched.chunks, from its first row (Exchanger.chunks_of).
    """
    sched = Schedule()
    used: dict[int, int] = defaultdict(int)  # bytes in each writer's current bucket
    bucket: dict[int, int] = defaultdict(int)
    for w, items in plan.write_order.items():
        for _, extent in items:
            if not extent.assembled:
                continue
            for seg in extent.segments:
                shape = shapes[seg.name]
                row = (seg.end - seg.begin) // (seg.hi - seg.lo)
                item = row // math.prod(shape[1:])  # 1-d (a small sharded tensor assembled whole): the item
                step = max(1, bucket_bytes // row)
                tilings = boxes[seg.name]
                own = next((t for t in tilings if is_nonempty(t.get(w))), tilings[0])
                holders: dict[Box, list[int]] = {}
                for t in tilings:
                    for r, b in t.items():
                        if is_nonempty(b):
                            holders.setdefault(b, []).append(r)
                tiles = sorted((b, sorted(holders[b])) for b in set(own.values()) if is_nonempty(b))
                for lo in range(seg.lo, seg.hi, step):
                    hi = min(seg.hi, lo + step)
                    size = (hi - lo) * row
                    if used[w] and used[w] + size > bucket_bytes:
                        bucket[w], used[w] = bucket[w] + 1, 0
                    used[w] += size
                    pieces = _pieces(item, tiles, lo, hi, w)
                    sched.chunks.append(Chunk(seg.name, w, (lo, hi), size, pieces, bucket[w]))
    sched.rounds = max((bucket[w] + 1 for w in used if used[w]), default=0)
    return sched


def _pieces(item: int, tiles: list[tuple[Box, list[int]]], lo: int, hi: int, writer: int) -> tuple[Piece, ...]:
    """One piece per box of the tiling overlapping rows [lo, hi), in row-major order of the boxes;
    tiles: (box, the ranks holding it)."""
    out = []
    for (off, shp), ranks in tiles:
        a, b = max(lo, off[0]), min(hi, off[0] + shp[0])
        if a >= b:
            continue
        # the writer reads its own copy; otherwise spread the sending over the holders
        src = writer if writer in ranks else ranks[lo % len(ranks)]
        p_shape = (b - a,) + shp[1:]
        out.append(Piece(src, (a,) + off[1:], p_shape, nbytes(p_shape, item)))
    return tuple(out)


def local_slice(local: torch.Tensor, box: Box, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The part of a rank's local tensor (holding `box`) at `offset`/`shape` of the global tensor."""
    if not shape:
        return local
    index = tuple(slice(o - bo, o - bo + s) for o, bo, s in zip(offset, box[0], shape))
    return local[index]


class Rounds:
    """The round engine of a Schedule on one rank, for either direction.

    gather (save): pieces go from their peers to the chunk's owner; scatter (load): from the owner
    to the peers. A rank's own pieces of its own chunks never enter the buffers.

    Each round: source(chunk) -> (tensor, box) for every chunk this rank packs (scatter: every chunk
    it owns, even one with no outgoing piece, as the owner reads it then), the tensor holding the
    global box `box`, from which its outgoing pieces are copied into the send buffer, each at a
    multiple of 16 bytes, by destination in schedule order; one all_to_all_bytes; then
    unpack(chunk, piece, data) for every incoming piece, by source then schedule order, data its
    uint8 bytes in the receive buffer (valid until the next round). Both buffers are reused.
    """

    def __init__(self, sched: Schedule, comm, gather: bool,
                 source: Callable[[Chunk], tuple[torch.Tensor, Box]],
                 unpack: Callable[[Chunk, Piece, torch.Tensor], None],
                 buffer: Callable[[str, int], torch.Tensor] | None = None,
                 dtype_of: Callable[[Chunk], torch.dtype] | None = None):
        self.comm, self.source, self.unpack, self.dtype_of = comm, source, unpack, dtype_of
        self.rounds = sched.rounds
        self.done = 0  # the rounds entered
        self.bytes_sent = 0  # what this rank sent to others
        self._buffer = buffer or self._own_buffer
        self._bufs: dict[str, torch.Tensor] = {}
        me = comm.rank
        # by round, in the agreed order: (chunk, [(destination, piece)]) this rank packs,
        # and (source, chunk, piece) it receives
        self.packs: list[list[tuple[Chunk, list[tuple[int, Piece]]]]] = [[] for _ in range(sched.rounds)]
        self.incoming: list[list[tuple[int, Chunk, Piece]]] = [[] for _ in range(sched.rounds)]
        for c in sched.chunks:
            if gather:
                if c.owner == me:
                    self.incoming[c.round].extend((p.peer, c, p) for p in c.pieces if p.peer != me)
                else:
                    out = [(c.owner, p) for p in c.pieces if p.peer == me]
                    if out:
                        self.packs[c.round].append((c, out))
            elif c.owner == me:
                self.packs[c.round].append((c, [(p.peer, p) for p in c.pieces if p.peer != me]))
            else:
                self.incoming[c.round].extend((c.owner, c, p) for p in c.pieces if p.peer == me)
        for lst in self.incoming:
            lst.sort(key=lambda x: x[0])  # stable: schedule order kept within a source

    def _own_buffer(self, name: str, n: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self._bufs[name] = torch.empty(n, dtype=torch.uint8)  # grown to the largest round
        return buf[:n]

    def round(self, k: int, work: bool = True) -> None:
        """Round k; always enters the collective (the other ranks wait for this rank's part), then
        raises what went wrong here, if anything. work=False (after an error): only the collective."""
        world = self.comm.world_size
        send_sizes = padded_sizes(world, ((dst, p.nbytes) for _, out in self.packs[k] for dst, p in out))
        recv_sizes = padded_sizes(world, ((src, p.nbytes) for src, _, p in self.incoming[k]))
        send = self._buffer("send", sum(send_sizes))
        error = None
        if work:
            try:
                self._pack(k, send, send_sizes)
            except Exception as e:
                error = e
        recv = self._buffer("recv", sum(recv_sizes))
        self.done = k + 1
        self.comm.all_to_all_bytes(send, send_sizes, recv, recv_sizes)
        if error is not None:
            raise error
        if not work:
            return
        self.bytes_sent += sum(p.nbytes for _, out in self.packs[k] for _, p in out)
        pos = 0
        for _, c, p in self.incoming[k]:
            self.unpack(c, p, recv[pos : pos + p.nbytes])
            pos += padded(p.nbytes)

    def _pack(self, k: int, send: torch.Tensor, send_sizes: list[int]) -> None:
        starts, pos = [], 0
        for n in send_sizes:
            starts.append(pos)
            pos += n
        for c, out in self.packs[k]:
            data, box = self.source(c)
            for dst, p in out:
                src = local_slice(data, box, p.offset, p.shape)
                at = starts[dst]
                # in the dtype the piece is stored in (a save with dtype= casts while packing)
                send[at : at + p.nbytes].view(self.dtype_of(c) if self.dtype_of else src.dtype).view(p.shape).copy_(src)
                starts[dst] = at + padded(p.nbytes)

    def run(self, skip_after_error: bool = True) -> None:
        """The rounds not entered yet, every one even after an error here (see run_rounds);
        skip_after_error: only the collectives after the first error."""
        run_rounds(range(self.done, self.rounds),
                   lambda k, ok: self.round(k, ok or not skip_after_error))


class Exchanger:
    """Runs the rounds of a save Schedule for one rank and hands each of its chunks over, assembled."""

    def __init__(self, sched: Schedule, comm, local: Mapping[str, torch.Tensor], my_boxes: Mapping[str, Box],
                 dtypes: Mapping[str, str]):
        self.sched, self.comm, self.local, self.my_boxes = sched, comm, local, my_boxes
        self.rank = comm.rank
        self.dtypes = dtypes
        self.received: dict[tuple, torch.Tensor] = {}  # (name, chunk's first row, piece offset) -> bytes
        # pieces go to the writers; the engine's own host buffers (the save's group is gloo)
        self.engine = Rounds(sched, comm, True, self._source, self._unpack,
                             dtype_of=lambda c: fmt.torch_dtype(dtypes[c.key]))
        self._first: dict[tuple[object, int], int] = {}  # (name, first row) -> its chunk's index
        for i, c in enumerate(sched.chunks):
            self._first[(c.key, c.rows[0])] = i

    @property
    def bytes_sent(self) -> int:
        """What this rank sent to others (the network's share of the save)."""
        return self.engine.bytes_sent

    def _source(self, c: Chunk) -> tuple[torch.Tensor, Box]:
        return self.local[c.key], self.my_boxes[c.key]

    def _unpack(self, c: Chunk, p: Piece, data: torch.Tensor) -> None:
        self.received[(c.key, c.rows[0], p.offset)] = data

    def _run_round(self) -> None:
        self.received = {}
        self.engine.round(self.engine.done)

    def chunks_of(self, seg: Segment) -> list[Chunk]:
        chunks = self.sched.chunks
        i = self._first[(seg.name, seg.lo)]  # an assembled segment starts a run of chunks
        out, row = [], seg.lo
        while i < len(chunks) and chunks[i].key == seg.name and chunks[i].rows[0] == row < seg.hi:
            out.append(chunks[i])
            row = chunks[i].rows[1]
            i += 1
        return out

    def filler(self, chunk: Chunk) -> Callable[[torch.Tensor, int, int], None]:
        """Runs rounds up to the chunk's; returns fill(dst, r0, r1), which copies rows [r0, r1) of
        the chunk (relative to its first row) from every piece into dst, a (r1 - r0, *row shape)
        view. Valid until the next round."""
        while self.engine.done <= chunk.round:
            self._run_round()
        dtype = fmt.torch_dtype(self.dtypes[chunk.key])
        first = chunk.rows[0]
        parts = []  # (the piece's rows relative to the chunk's first, its columns, its data)
        for p in chunk.pieces:
            if p.peer == self.rank:
                data = local_slice(self.local[chunk.key], self.my_boxes[chunk.key], p.offset, p.shape)
            else:
                data = self.received[(chunk.key, chunk.rows[0], p.offset)].view(dtype).view(p.shape)
            a = p.offset[0] - first
            cols = tuple(slice(o, o + s) for o, s in zip(p.offset[1:], p.shape[1:]))
            parts.append((a, a + p.shape[0], cols, data))

        def fill(dst: torch.Tensor, r0: int, r1: int) -> None:
            # a piece spans all the chunk's rows (split by columns) or some of them (by rows)
            for a, b, cols, data in parts:
                lo, hi = max(a, r0), min(b, r1)
                if lo < hi:
                    dst[(slice(lo - r0, hi - r0),) + cols].copy_(data[lo - a : hi - a])

        return fill

    def finish(self) -> None:
        """Take part in the rounds left (this rank may still have pieces to send), even after an
        error here; stop only when a collective fails (the group is broken)."""
        run_rounds(range(self.engine.done, self.sched.rounds), lambda k, ok: self._run_round())


def run_rounds(rounds: Iterable[int], step: Callable[[int, bool], None]) -> None:
    """step(k, ok) for every round k, even after an error on this rank (the others wait for its
    part of each round's collective; ok turns False after the first error); raises that error at
    the end, or at once if a collective fails (CollectiveError: the group is broken, nobody is waiting)."""
    error = None
    for k in rounds:
        try:
            step(k, error is None)
        except CollectiveError:
            raise
        except Exception as e:
            error = error or e
    if error is not None:
        raise error


def padded(n: int) -> int:
    """n rounded up to the pieces' alignment in the send/receive buffers."""
    return -(-n // _PIECE_ALIGN) * _PIECE_ALIGN


def padded_sizes(world: int, pieces: Iterable[tuple[int, int]]) -> list[int]:
    """The bytes for each rank in a send or receive buffer of (rank, nbytes) pieces, each padded."""
    sizes = [0] * world
    for rank, n in pieces:
        sizes[rank] += padded(n)
    return sizes
