"""Moving shard bytes for loads: column-split targets read once per group.

A target box that is not one run of the file (rowwise TP Shard(1), 2-D) would make each rank read
whole rows: an N-way column split reads those tensors N times over. Instead the ranks that need a
tensor split its row bands among themselves, each reads its rows once (one sequential read per
chunk) and hands the others their column pieces, a bounded bucket per reader per round, one
all_to_all per round: the save's exchange in reverse, with its types and round engine (exchange:
a chunk's owner is its reader, a piece's peer the rank receiving it). Every rank derives the same
schedule from the gathered descriptions (tensor, file, shape, dtype, layout), so no sizes travel.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import format as fmt
from .buffers import scratch
from .exchange import DEFAULT_BUCKET_BYTES, Chunk, Piece, Rounds, Schedule, local_slice
from .layout import Box, Layout, group_boxes, is_nonempty, merged
from .format import nbytes

__all__ = ["ColumnRead", "ColumnLoader", "make_schedule", "Chunk", "Piece", "Schedule", "DEFAULT_BUCKET_BYTES"]


@dataclass(frozen=True)
class ColumnRead:
    """A tensor some rank needs as a column-split box: the same description on every such rank."""

    key: tuple  # (part, stored name): unique within one load
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code
    layout: Layout  # the target's (each replica group may have its own)


def make_schedule(reads: Mapping[tuple, tuple[ColumnRead, ...]], group_rank: Callable[[int], int],
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Schedule:
    """Pure: who reads which rows of every column-split tensor, and the pieces each sends.

    reads: key -> the descriptions of that tensor (one per distinct layout). Each row band (cut at
    the boxes' row boundaries) is split into one sub-band per rank needing it, read by that rank
    (least loaded first); chunks of at most bucket_bytes per reader per round. A chunk carries one
    piece per rank needing its rows: an N-way column split makes N x N pieces per band.
    sched.boxes: key -> group rank -> the box of the global tensor its target holds.
    """
    sched = Schedule()
    load: dict[int, int] = defaultdict(int)  # bytes each rank reads
    used: dict[int, int] = defaultdict(int)
    bucket: dict[int, int] = defaultdict(int)
    for key in sorted(reads):
        descs = reads[key]
        d = descs[0]
        layouts = tuple(sorted({x.layout for x in descs}, key=repr))
        boxes = merged(group_boxes(repr(key[1]), d.shape, layouts, group_rank))
        sched.boxes[key] = boxes
        needs = {r: b for r, b in boxes.items() if is_nonempty(b)}
        if not needs or not d.shape:
            continue
        item = fmt.itemsize(d.dtype)
        row = nbytes(d.shape[1:], item)
        spans: dict[tuple[int, int], list] = defaultdict(list)  # row range -> the (rank, box) needing it
        for r, box in sorted(needs.items()):
            spans[(box[0][0], box[0][0] + box[1][0])].append((r, box))
        cuts = sorted({0, d.shape[0]} | {c for span in spans for c in span})
        for a, b in zip(cuts, cuts[1:]):
            # the cuts include every box's row bounds: a box meeting the band holds all its rows
            band = sorted(x for (lo, hi), xs in spans.items() if lo < b and hi > a for x in xs)
            if not band:
                continue  # rows nobody needs
            k = min(len(band), b - a)
            readers = sorted((r for r, _ in band), key=lambda r: (load[r], r))[:k]  # least loaded first
            for j, reader in enumerate(readers):
                lo, hi = a + (b - a) * j // k, a + (b - a) * (j + 1) // k
                load[reader] += (hi - lo) * row
                step = max(1, bucket_bytes // row) if row else hi - lo
                for c_lo in range(lo, hi, step):
                    c_hi = min(hi, c_lo + step)
                    size = (c_hi - c_lo) * row
                    if used[reader] and used[reader] + size > bucket_bytes:
                        bucket[reader], used[reader] = bucket[reader] + 1, 0
                    used[reader] += size
                    pieces = tuple(_piece(dst, box, c_lo, c_hi, item) for dst, box in band)
                    sched.chunks.append(Chunk(key, reader, (c_lo, c_hi), size, pieces, bucket[reader]))
    sched.rounds = max((bucket[r] + 1 for r in used if used[r]), default=0)
    return sched


def _piece(dst: int, box: Box, lo: int, hi: int, item: int) -> Piece:
    off, shp = box
    a, b = max(lo, off[0]), min(hi, off[0] + shp[0])
    shape = (b - a,) + tuple(shp[1:])
    return Piece(dst, (a,) + tuple(off[1:]), shape, nbytes(shape, item))


class ColumnLoader:
    """Runs a load Schedule on one rank: reads its chunks, sends and receives the pieces, and
    copies this rank's pieces into its targets."""

    def __init__(self, sched: Schedule, comm, targets: Mapping[tuple, torch.Tensor],
                 open_tensor: Callable[[tuple], object], progress=None):
        """targets: key -> this rank's local tensor (its box of the global tensor);
        open_tensor(key) -> the open weights file holding it (ShardFile or LegacyFile)."""
        self.sched, self.comm, self.targets = sched, comm, targets
        self.open_tensor, self.progress = open_tensor, progress
        self.rank = comm.rank
        self.bytes_read = 0
        cuda = any(t.device.type == "cuda" for t in targets.values())
        self.pin = cuda and torch.cuda.is_available()  # pinned staging: the host-to-device copies are DMA
        # pieces go from the readers to the ranks needing them
        self.engine = Rounds(sched, comm, False, self._read, self._unpack, self._buffer)

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        return scratch(f"load_exchange.{name}", n, self.pin)  # reused across loads: fresh memory is slow

    def _into_target(self, key: tuple, piece: Piece, data: torch.Tensor) -> None:
        box = self.sched.boxes[key][self.rank]
        dst = local_slice(self.targets[key], box, piece.offset, piece.shape)
        dst.copy_(data)  # blocking: the buffer is free to reuse once it returns
        if self.progress is not None:
            self.progress.add(piece.nbytes)

    def run(self) -> None:
        """Every round, even after an error here (the others wait for this rank's part); raises
        the first error at the end, or at once if a collective fails."""
        self.engine.run()

    def _read(self, c: Chunk) -> tuple[torch.Tensor, Box]:
        """Reads the chunk's rows (whole rows: one read), delivers this rank's own piece; the
        engine sends the others theirs."""
        f = self.open_tensor(c.key)
        dtype, shape, _ = f.info(c.key[1])
        n = c.rows[1] - c.rows[0]
        rows = self._buffer("read", c.nbytes).view(dtype).view((n,) + tuple(shape[1:]))
        box = ((c.rows[0],) + (0,) * (len(shape) - 1), (n,) + tuple(shape[1:]))
        self.bytes_read += f.read_into(c.key[1], rows, box)
        for p in c.pieces:
            if p.peer == self.rank:
                self._into_target(c.key, p, local_slice(rows, box, p.offset, p.shape))
        return rows, box

    def _unpack(self, c: Chunk, p: Piece, data: torch.Tensor) -> None:
        self._into_target(c.key, p, data.view(self.targets[c.key].dtype).view(p.shape))
