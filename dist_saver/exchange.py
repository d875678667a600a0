"""Moving shard bytes: only for row bands no rank holds as one run of the file (column shards).

The plan writes every band that some rank holds whole (Shard(0) pieces, replicated tensors) in
place, from that rank's memory: those bytes never cross the network. A band split by columns
(rowwise TP, 2-D) has a writer among the ranks holding its pieces; it is cut into row chunks of at
most the bucket size, and each chunk needs one piece from every distinct box overlapping it
(replicated boxes are sent once, by one holder). Every round, each writer receives its next bucket
of chunks from all ranks in one all_to_all and assembles them straight into the writer's buffers,
in file order. Every rank derives the same schedule from the plan, so no sizes travel.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import format as fmt
from .layout import Box
from .plan import Plan, Segment

DEFAULT_BUCKET_BYTES = 16 << 20  # small rounds pipeline best with the writes (0.69x -> 0.86x of raw O_DIRECT, FSDP2 on 2 ranks)


@dataclass(frozen=True)
class Piece:
    src: int  # group rank that sends it
    offset: tuple[int, ...]  # in the global tensor
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    name: str
    writer: int  # the rank that assembles and writes it
    rows: tuple[int, int]  # [begin, end) along dim 0 of the global tensor
    nbytes: int
    pieces: tuple[Piece, ...]
    round: int = 0


@dataclass
class Schedule:
    # (tensor name, first row of its segment) -> the segment's chunks, in order
    chunks: dict[tuple[str, int], list[Chunk]] = field(default_factory=dict)
    rounds: int = 0

    def senders(self) -> set[tuple[str, int]]:
        """(tensor, group rank) pairs: which ranks send pieces of which tensors."""
        return {(c.name, p.src) for cs in self.chunks.values() for c in cs for p in c.pieces}


def make_schedule(
    plan: Plan,
    shapes: Mapping[str, tuple[int, ...]],
    boxes: Mapping[str, Mapping[int, Box]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Schedule:
    """Pure: the chunks and rounds of every assembled segment of the plan.

    Each writer's chunks are numbered into rounds in the order it writes them (plan.write_order),
    at most bucket_bytes per writer per round (a single row larger than that is one chunk).
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
                item = row // math.prod(shape[1:])  # assembled segments have at least 2 dims
                step = max(1, bucket_bytes // row)
                chunks = []
                for lo in range(seg.lo, seg.hi, step):
                    hi = min(seg.hi, lo + step)
                    nbytes = (hi - lo) * row
                    if used[w] and used[w] + nbytes > bucket_bytes:
                        bucket[w], used[w] = bucket[w] + 1, 0
                    used[w] += nbytes
                    pieces = _pieces(shape, item, boxes[seg.name], lo, hi, w)
                    chunks.append(Chunk(seg.name, w, (lo, hi), nbytes, pieces, bucket[w]))
                sched.chunks[(seg.name, seg.lo)] = chunks
    sched.rounds = max((bucket[w] + 1 for w in used if used[w]), default=0)
    return sched


def _pieces(shape, item, boxes: Mapping[int, Box], lo: int, hi: int, writer: int) -> tuple[Piece, ...]:
    """One piece per distinct box overlapping rows [lo, hi), in row-major order of the boxes."""
    holders: dict[Box, list[int]] = {}
    for r, b in sorted(boxes.items()):
        if all(s > 0 for s in b[1]):
            holders.setdefault(b, []).append(r)
    out = []
    for (off, shp), ranks in sorted(holders.items()):
        a, b = max(lo, off[0]), min(hi, off[0] + shp[0])
        if a >= b:
            continue
        # the writer reads its own copy; otherwise spread the sending over the holders
        src = writer if writer in ranks else ranks[lo % len(ranks)]
        p_shape = (b - a,) + shp[1:]
        n = item
        for s in p_shape:
            n *= s
        out.append(Piece(src, (a,) + off[1:], p_shape, n))
    return tuple(out)


def local_slice(local: torch.Tensor, box: Box, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The part of a rank's local tensor (holding `box`) at `offset`/`shape` of the global tensor."""
    if not shape:
        return local
    index = tuple(slice(o - bo, o - bo + s) for o, bo, s in zip(offset, box[0], shape))
    return local[index]


class Exchanger:
    """Runs the rounds of a Schedule for one rank and hands each of its chunks over, assembled."""

    def __init__(self, sched: Schedule, comm, local: Mapping[str, torch.Tensor], my_boxes: Mapping[str, Box],
                 dtypes: Mapping[str, str]):
        self.sched, self.comm, self.local, self.my_boxes = sched, comm, local, my_boxes
        self.rank = comm.rank
        self.done_rounds = 0
        self.dtypes = dtypes
        self.bytes_sent = 0  # what this rank sent to others (the network's share of the save)
        # every piece this rank sends or receives, by round, in the agreed order
        self.send: list[list[tuple[int, str, Piece]]] = [[] for _ in range(sched.rounds)]
        self.recv: list[list[tuple[int, str, int, Piece]]] = [[] for _ in range(sched.rounds)]
        for chunks in sched.chunks.values():
            for c in chunks:
                for p in c.pieces:
                    if p.src == self.rank and c.writer != self.rank:
                        self.send[c.round].append((c.writer, c.name, p))
                    if c.writer == self.rank and p.src != self.rank:
                        self.recv[c.round].append((p.src, c.name, c.rows[0], p))
        for lst in self.send:
            lst.sort(key=lambda x: x[0])  # stable: chunk order kept within a destination
        for lst in self.recv:
            lst.sort(key=lambda x: x[0])
        # host buffers (the save's group is gloo), grown to the largest round, then reused
        self._send_buf = torch.empty(0, dtype=torch.uint8)
        self._recv_buf = torch.empty(0, dtype=torch.uint8)
        self.received: dict[tuple, torch.Tensor] = {}  # (name, chunk's first row, piece offset) -> bytes

    def _buffer(self, attr: str, n: int) -> torch.Tensor:
        buf = getattr(self, attr)
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.uint8)
            setattr(self, attr, buf)
        return buf[:n]

    def _run_round(self) -> None:
        k = self.done_rounds
        world = self.comm.world_size
        send_sizes = [0] * world
        for dst, _, p in self.send[k]:
            send_sizes[dst] += p.nbytes
        recv_sizes = [0] * world
        for src, _, _, p in self.recv[k]:
            recv_sizes[src] += p.nbytes
        send = self._buffer("_send_buf", sum(send_sizes))
        pos = 0
        for _, name, p in self.send[k]:
            src = local_slice(self.local[name], self.my_boxes[name], p.offset, p.shape)
            send[pos : pos + p.nbytes].view(src.dtype).view(p.shape).copy_(src)
            pos += p.nbytes
        recv = self._buffer("_recv_buf", sum(recv_sizes))
        self.comm.all_to_all_bytes(send, send_sizes, recv, recv_sizes)
        self.bytes_sent += pos
        self.received = {}
        pos = 0
        for src, name, row, p in self.recv[k]:
            self.received[(name, row, p.offset)] = recv[pos : pos + p.nbytes]
            pos += p.nbytes
        self.done_rounds += 1

    def chunks_of(self, seg: Segment) -> list[Chunk]:
        return self.sched.chunks[(seg.name, seg.lo)]

    def filler(self, chunk: Chunk) -> Callable[[torch.Tensor, int, int], None]:
        """Runs rounds up to the chunk's; returns fill(dst, r0, r1), which copies rows [r0, r1) of
        the chunk (relative to its first row) from every piece into dst, a (r1 - r0, *row shape)
        view. Valid until the next round."""
        while self.done_rounds <= chunk.round:
            self._run_round()
        dtype = fmt.torch_dtype(self.dtypes[chunk.name])
        parts = []
        for p in chunk.pieces:
            if p.src == self.rank:
                data = local_slice(self.local[chunk.name], self.my_boxes[chunk.name], p.offset, p.shape)
            else:
                data = self.received[(chunk.name, chunk.rows[0], p.offset)].view(dtype).view(p.shape)
            cols = tuple(slice(o, o + s) for o, s in zip(p.offset[1:], p.shape[1:]))
            parts.append((cols, data))

        def fill(dst: torch.Tensor, r0: int, r1: int) -> None:
            for cols, data in parts:
                dst[(slice(None),) + cols].copy_(data[r0:r1])

        return fill

    def finish(self) -> None:
        """Take part in the rounds left (this rank may still have pieces to send)."""
        while self.done_rounds < self.sched.rounds:
            self._run_round()
