"""This rank's share of a save: the files it owns created, then the byte ranges the plan gives it
written in place.

Extents whose bytes this rank holds (its Shard(0) pieces, the replicated tensors it writes) are
streamed from its own memory on the calling thread. Extents assembled from several ranks' pieces
(column shards) are filled by an exchange thread, which also takes part in every round of the
exchange, so the other writers get this rank's pieces even while this one writes its own. Both
threads feed the same buffer pool and writer thread, so the exchange overlaps the local writes.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Mapping

import torch

from . import format as fmt
from .exchange import Exchanger, Schedule
from .layout import Box, Tiling, merged
from .plan import Extent, FilePlan, Plan, Segment
from .writer import RangeStream, Streamer, WrittenRange


def create_files(plan: Plan, streamer: Streamer, staging: str, rank: int, checkpoint_id: str) -> list[WrittenRange]:
    """As owner: each of this rank's files, with its header (marked with the save's checkpoint_id)
    and final size (before anyone writes)."""
    return [streamer.create(os.path.join(staging, f.name), f.header_for(checkpoint_id), f.size)
            for f in plan.files_of(rank)]


def write_share(plan: Plan, sched: Schedule, comm, streamer: Streamer, staging: str,
                local: Mapping[str, torch.Tensor], boxes: Mapping[str, Tiling],
                shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> tuple[list[WrittenRange], int]:
    """Write every extent the plan gives this rank; returns its ranges (checksums complete after
    streamer.finish()) and the bytes it sent to other ranks."""
    rank = comm.rank
    my_boxes = {name: b[rank] for name, b in ((n, merged(t)) for n, t in boxes.items()) if rank in b}
    mine = plan.extents_of(rank)
    exchanger = Exchanger(sched, comm, local, my_boxes, dtypes)
    helper = None
    if sched.rounds:  # every rank takes part in every round, writer or not
        ready = None
        if any(t.device.type == "cuda" for t in local.values()):
            ready = torch.cuda.Event()  # the exchange thread's copies must see the caller's work
            ready.record()
        helper = _ExchangeThread(exchanger, streamer, staging, [(f, e) for f, e in mine if e.assembled],
                                 shapes, dtypes, ready)
        helper.start()

    as_dtype = _Dtypes()

    def own_pieces(segments: tuple[Segment, ...]):  # (rows this rank holds whole, the dtype saved in)
        for seg in segments:
            name = seg.name
            t = local[name]
            if seg.lo == 0 and name not in my_boxes:  # all of a tensor held whole: no view needed
                shape = shapes[name]
                if seg.hi == (shape[0] if shape else 1):
                    yield t, as_dtype[dtypes[name]]
                    continue
            yield _rows(t, my_boxes.get(name), seg), as_dtype[dtypes[name]]

    def put_own(stream: RangeStream, segments: tuple[Segment, ...]) -> None:  # (cast if saved so)
        stream.put_many(own_pieces(segments))

    ranges: list[WrittenRange] = []
    error: BaseException | None = None
    try:
        for f, extent in mine:
            if not extent.assembled:
                ranges.append(_write_extent(streamer, staging, f, extent, put_own))
    except BaseException as e:  # the exchange thread still finishes its rounds: the others need them
        error = e
    if helper is not None:
        helper.join()
        ranges += helper.ranges
        error = error or helper.error
    if error is not None:
        raise error
    return ranges, exchanger.bytes_sent


def _write_extent(streamer: Streamer, staging: str, f: FilePlan, extent: Extent,
                 put: Callable[[RangeStream, tuple[Segment, ...]], None]) -> WrittenRange:
    """Stream one extent of file f into place: put(stream, segments) appends the bytes of the
    extent's segments, in order."""
    stream = streamer.open_range(os.path.join(staging, f.name), f.data_start + extent.begin,
                                 f.data_start + extent.end)
    with stream.returning_buffers():  # a failing segment gives its buffer back to the pool
        put(stream, extent.segments)
    return stream.close()


class _Dtypes(dict):
    """safetensors code -> torch dtype, filled as met."""

    def __missing__(self, code: str) -> torch.dtype:
        self[code] = dtype = fmt.torch_dtype(code)
        return dtype


def _rows(local: torch.Tensor, box: Box | None, seg: Segment) -> torch.Tensor:
    """Rows [seg.lo, seg.hi) of the global tensor from this rank's piece (which holds them whole)."""
    if local.dim() == 0:
        return local
    first = box[0][0] if box is not None else 0
    return local[seg.lo - first : seg.hi - first]


class _ExchangeThread(threading.Thread):
    """Runs the exchange's rounds in order and writes this rank's assembled extents from them."""

    def __init__(self, exchanger: Exchanger, streamer: Streamer, staging: str,
                 extents: list[tuple[FilePlan, Extent]], shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, str], ready=None):
        super().__init__(name="dist_saver-exchange", daemon=True)
        self.exchanger, self.streamer, self.staging = exchanger, streamer, staging
        self.extents, self.shapes, self.dtypes, self.ready = extents, shapes, dtypes, ready
        self.ranges: list[WrittenRange] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.ready is not None:
                self.ready.synchronize()
            for f, extent in self.extents:
                self.ranges.append(_write_extent(self.streamer, self.staging, f, extent, self._put_assembled))
        except BaseException as e:
            self.error = e
        finally:
            try:
                self.exchanger.finish()  # the other writers may still need this rank's pieces
            except BaseException as e:
                self.error = self.error or e

    def _put_assembled(self, stream: RangeStream, segments: tuple[Segment, ...]) -> None:
        for seg in segments:
            shape = self.shapes[seg.name]
            dtype = fmt.torch_dtype(self.dtypes[seg.name])
            for chunk in self.exchanger.chunks_of(seg):
                fill = self.exchanger.filler(chunk)  # runs the rounds up to the chunk's
                stream.put_rows(chunk.rows[1] - chunk.rows[0], shape[1:], dtype, fill)
