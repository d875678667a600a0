"""Reads boxes of tensors out of safetensors files with positioned reads, straight into the target,
checking the recorded checksums of the bytes as they are read.

Why not safetensors' own mmap + get_slice: on a cold cache its page faults pull in whole tensors
and more (kernel readahead; measured here: 56-64 MiB read from disk for a 16 MiB quarter of a
64 MiB tensor), so a rank loading 1/N of a model read most of it. With POSIX_FADV_RANDOM and
vectored positioned reads of the planned byte spans (load_plan.box_items), the disk sees the
shard's bytes, many small tensors cost one system call, and a contiguous CPU target is filled
without an intermediate copy.

Checks while reading: a file opened with its recorded checksums (index.open_shard) hashes every
block (checksum.BLOCK_BYTES, cut at the recorded ranges' edges) that a read touches, right after
the read of at most READ_BATCH bytes (while they are in the CPU's cache), reading the rest of a
block it needs only part of; a mismatch raises CheckpointError naming the file, the byte range
and the rank that wrote it. A block is checked once per open file.
"""

from __future__ import annotations

import abc
import bisect
import math
import os
import struct
import warnings
from typing import NamedTuple, Sequence

import torch

from . import format as fmt
from .buffers import StagingBuffer, as_bytes, staging_buffer
from .checksum import Hasher, parse
from .errors import CheckpointError, DistSaverWarning
from .load_plan import Item, box_items

# Bytes per vectored read (and per batch hashed right after it), and iovecs per read (Linux takes 1024).
READ_BATCH = 8 << 20
MAX_IOVECS = 512


class TensorEntry(NamedTuple):
    """What a weights file says of one tensor (WeightsFile.info)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    # Absolute file offset of the tensor's first data byte (ShardFile); None where the file has
    # no flat data region to address (LegacyFile: a zip archive of storages).
    offset: int | None


class WeightsFile(abc.ABC):
    """The reading interface of one open weights file, whatever its format: what it holds, and
    boxes of its tensors read into tensors the caller owns. A context manager (close() on exit).

    Subclasses set path, and count the bytes they read in bytes_read.
    """

    path: str
    bytes_read: int
    metadata: dict = {}  # the header's __metadata__ (safetensors); empty where there is none

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The tensors' names, in the order the file lists them."""

    @abc.abstractmethod
    def ties(self) -> dict[str, str]:
        """{name: first name} for entries that are one tensor stored under two names."""

    @abc.abstractmethod
    def info(self, name: str) -> TensorEntry:
        """(dtype, shape, offset) of a tensor; CheckpointError if the file has no such tensor."""

    @abc.abstractmethod
    def read_into(self, name: str, out: torch.Tensor, box: tuple | None = None,
                  staging: StagingBuffer | None = None) -> int:
        """Fill out with the box (offset, shape) of tensor name (default: all of it); returns the
        bytes read. CheckpointError if out's dtype or shape is not the box's."""

    def read_many(self, requests: Sequence[tuple[str, torch.Tensor, tuple | None]],
                  staging: StagingBuffer | None = None) -> int:
        """read_into for each (name, out, box); returns the bytes read."""
        return sum(self.read_into(name, out, box, staging) for name, out, box in requests)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file (descriptors, maps); the object is not used after."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _box(self, name: str, out: torch.Tensor, box: tuple | None) -> tuple[TensorEntry, tuple, tuple]:
        """(entry, box offset, box shape) of a read_into call, the box defaulting to the whole
        tensor, once out is checked to be the box's dtype and shape."""
        entry = self.info(name)
        offset, bshape = box if box is not None else ((0,) * len(entry.shape), entry.shape)
        if out.dtype != entry.dtype or tuple(out.shape) != tuple(bshape):
            raise CheckpointError(f"{self.path}: cannot read {name!r} box {list(bshape)} {entry.dtype} "
                                  f"into {out.dtype}{list(out.shape)}")
        return entry, tuple(offset), tuple(bshape)


class ShardFile(WeightsFile):
    """One open safetensors file: its validated header and positioned reads into tensors."""

    def __init__(self, path: str, recorded: Sequence | None = None):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0
        self.bytes_checked = 0  # bytes whose recorded checksums were checked
        try:
            if hasattr(os, "posix_fadvise"):  # no readahead: read the ranges asked for, no more
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.size = os.fstat(self.fd).st_size
            self.checks = _Checks(path, recorded, self.size) if recorded is not None else None
            if self.checks is not None:  # the header decides what every read means: its bytes checked first
                raw = os.pread(self.fd, 8, 0)
                length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                self._sweep([Item(0, min(self.size, 8 + length), -1, 0, None, None, None)], [], None)
            self.header, self.data_start = fmt.read_header(path, self.fd)
            meta = self.header.get("__metadata__")
            self.metadata = meta if isinstance(meta, dict) else {}
            self._check_layout()
        except BaseException:
            os.close(self.fd)
            raise

    def _check_layout(self) -> None:
        """Every entry well-formed and fitting the file, and the entries tiling the data region
        exactly, as the safetensors library requires: a header length smaller than the header
        (which would shift every tensor) leaves trailing bytes, a hole or overlap is damage."""
        self._entries = {}
        spans = []
        path = self.path
        for name, entry in self.header.items():
            if name != "__metadata__":
                dtype, shape, begin, n = _parse_entry(path, name, entry)
                self._entries[name] = (dtype, shape, begin)
                spans.append((begin, begin + n, name))
        spans.sort()
        data = self.size - self.data_start
        pos, prev = 0, None
        for begin, end, name in spans:
            if begin != pos:
                if end > data:
                    raise CheckpointError(f"{path}: tensor {name!r} has data offsets [{begin}, {end}] that do not "
                                          f"fit the file ({self.size} bytes, data from byte {self.data_start})")
                if begin < pos:
                    raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap in the file")
                raise CheckpointError(f"{path}: data bytes [{pos}, {begin}) before tensor {name!r} belong to "
                                      "no tensor: the header's data_offsets are wrong")
            if end > data:
                raise CheckpointError(f"{path}: tensor {name!r} has data offsets [{begin}, {end}] that do not "
                                      f"fit the file ({self.size} bytes, data from byte {self.data_start})")
            pos, prev = end, name
        if pos != data:
            raise CheckpointError(f"{path}: the tensors fill {pos} bytes of data but the header length field "
                                  f"({self.data_start - 8}) leaves {data}: the header length or data_offsets are "
                                  "wrong, or the file has trailing bytes")

    def close(self) -> None:
        os.close(self.fd)

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def ties(self) -> dict[str, str]:
        """Entries that are one tensor: none, since no two entries may share bytes (checked)."""
        return {}

    def info(self, name: str) -> TensorEntry:
        """(dtype, shape, absolute file offset) of a tensor (checked against the file on opening)."""
        found = self._entries.get(name)
        if found is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this file")
        dtype, shape, begin = found
        return TensorEntry(dtype, shape, self.data_start + begin)

    def read_into(self, name: str, out: torch.Tensor, box: tuple | None = None,
                  staging: StagingBuffer | None = None) -> int:
        """Fill `out` with the box (offset, shape) of tensor `name` (default: all of it).

        out may live anywhere (CPU, CUDA, non-contiguous): bytes that cannot be read into it
        directly go through the staging buffers (for CUDA: pinned, each block's copy to the
        device overlapping the read of the next; the caller calls staging.finish() before using
        out). Returns the bytes read (checked blocks' extra bytes included).
        """
        return self.read_many([(name, out, box)], staging)

    def read_many(self, requests: Sequence[tuple[str, torch.Tensor, tuple | None]],
                  staging: StagingBuffer | None = None) -> int:
        """Fill each (name, out, box) of requests in one sweep over the file in offset order:
        adjacent spans share vectored reads, each checked block is read and hashed once."""
        items: list[Item] = []
        outs = [out for _, out, _ in requests]
        own = staging is None
        staging = staging or staging_buffer()
        chunk = min(READ_BATCH, staging.nbytes)
        for i, (name, out, box) in enumerate(requests):
            (dtype, shape, start), offset, bshape = self._box(name, out, box)
            direct = out.device.type == "cpu" and out.is_contiguous()
            items += box_items(start, shape, dtype.itemsize, offset, bshape, direct, i, chunk)
        try:
            before = self.bytes_read
            self._sweep(items, outs, staging)
            return self.bytes_read - before
        finally:
            if own:  # the caller's buffer is finished by the caller, before it uses the targets
                staging.finish()

    def verify(self) -> int:
        """Check every recorded block of the file (verify()); returns the bytes checked."""
        if self.checks is None:
            raise CheckpointError(f"{self.path}: opened without recorded checksums")
        if self.checks.unknown:
            raise CheckpointError(self.checks.unknown[0])
        self._sweep([Item(0, self.size, -1, 0, None, None, None)], [], None)
        return self.bytes_checked

    def _preadv(self, views: list, offset: int) -> None:
        """Fill views, in order, with the file's bytes from offset: every read of this file goes
        through here."""
        want = sum(len(v) for v in views)
        try:
            got = os.preadv(self.fd, views, offset)
        except OSError as e:  # an unreadable checkpoint: its file and bytes named (read() names neither)
            raise CheckpointError(f"{self.path}: reading bytes [{offset}, {offset + want}) failed: "
                                  f"[Errno {e.errno}] {e.strerror or e}") from e
        if got != want:  # a regular file returns short only at its end
            raise CheckpointError(f"{self.path}: file is truncated (short read of bytes [{offset}, {offset + want}))")

    def _sweep(self, items: list[Item], outs: list, staging: StagingBuffer | None) -> None:
        """Read every item's bytes into its target in file order, with the unchecked blocks they
        touch (items of target -1 are read only to be checked)."""
        items = sorted(items)
        # Items for different targets may overlap (two targets of one tensor): later sweeps.
        layers: list[list[Item]] = [[]]
        for it in items:
            for layer in layers:
                if not layer or layer[-1].offset + layer[-1].nbytes <= it.offset:
                    layer.append(it)
                    break
            else:
                layers.append([it])
        staging = staging or staging_buffer()
        pinned = any(o.device.type == "cuda" for o in outs)
        for layer in layers:
            self._sweep_layer(layer, outs, staging, pinned)

    def _sweep_layer(self, items: list[Item], outs: list, staging: StagingBuffer, pinned: bool) -> None:
        checks = self.checks
        blocks = checks.unchecked(items) if checks is not None else []
        # The file spans to read: the items, widened to the blocks they touch, merged.
        spans: list[list] = []  # [begin, end, items]
        bi = 0
        for it in items:
            a, b = it.offset, it.offset + it.nbytes
            while bi < len(blocks) and blocks[bi].stop <= a:
                bi += 1
            j = bi
            while j < len(blocks) and blocks[j].start < b:
                a, b = min(a, blocks[j].start), max(b, blocks[j].stop)
                j += 1
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
                spans[-1][2].append(it)
            else:
                spans.append([a, b, [it]])
        feed = _BlockFeed(self.path, blocks)
        for begin, end, span_items in spans:
            self._read_span(begin, end, span_items, outs, staging, pinned, feed)
        feed.done()
        if checks is not None:
            checks.mark(blocks)
            self.bytes_checked += sum(b.stop - b.start for b in blocks)

    def _read_span(self, begin: int, end: int, items: list[Item], outs: list, staging: StagingBuffer,
                   pinned: bool, feed: "_BlockFeed") -> None:
        """One contiguous file span, in batches of at most READ_BATCH bytes: one vectored read,
        the checked blocks hashed, then the staged items copied into their targets."""
        pos, k = begin, 0
        limit = min(READ_BATCH, staging.nbytes)  # staged items are planned at most this large
        while pos < end:
            batch = _Batch(staging, pinned)
            start = pos
            while pos < end and batch.total < limit and len(batch.views) < MAX_IOVECS:
                it = items[k] if k < len(items) else None
                if it is None or it.offset > pos:  # a gap: bytes of a block being checked
                    stop = min(end if it is None else it.offset, pos + limit - batch.total)
                    batch.stage(stop - pos)
                    pos = stop
                    continue
                left = it.offset + it.nbytes - pos
                if it.target < 0:  # read only to be checked
                    pos += batch.stage(min(left, limit - batch.total))
                elif it.dst_box is None:  # straight into a contiguous CPU target
                    n = min(left, limit - batch.total)
                    at = it.at + pos - it.offset
                    batch.direct(as_bytes(outs[it.target])[at : at + n])
                    pos += n
                else:  # staged whole, then copied out
                    if batch.total and batch.total + it.nbytes > limit:
                        break
                    pos += batch.stage(it.nbytes, it)
                if pos >= it.offset + it.nbytes:
                    k += 1
            self._preadv(batch.views, start)
            self.bytes_read += batch.total
            at = start
            for v in batch.views:
                feed.feed(at, v)
                at += len(v)
            for it, data in batch.copies:
                _deliver(it, data, outs, staging)


class _Batch:
    """The buffers of one vectored read: targets' own bytes, and a staging buffer's for gaps and
    for items copied out after the read."""

    def __init__(self, staging: StagingBuffer, pinned: bool):
        self.staging, self.pinned = staging, pinned
        self.views: list = []
        self.copies: list = []
        self.total = 0
        self.buf = None
        self.used = 0

    def direct(self, view) -> None:
        self.views.append(view)
        self.total += len(view)

    def stage(self, n: int, item: Item | None = None) -> int:
        if self.buf is None:
            self.buf = self.staging.get(pinned=self.pinned)
        if self.used + n > self.buf.numel():
            raise AssertionError("a read batch outgrew the staging buffer")  # READ_BATCH is below its size
        data = self.buf[self.used : self.used + n]
        self.used += n
        self.views.append(as_bytes(data))
        self.total += n
        if item is not None:
            self.copies.append((item, data))
        return n


def _deliver(it: Item, data: torch.Tensor, outs: list, staging: StagingBuffer) -> None:
    """Copy a staged item's bytes into its part of the target."""
    out = outs[it.target]
    src = data.view(out.dtype).view(it.src_shape)
    dst = out[tuple(slice(o, o + s) for o, s in zip(*it.dst_box))] if it.dst_box[1] else out
    index = None if it.src_box is None else tuple(slice(o, o + s) for o, s in zip(*it.src_box))
    staging.upload(dst, src, index)


class _Block(NamedTuple):
    start: int
    stop: int
    digest: str
    rank: object
    key: tuple  # (range index, block index): checked once per open file


class _Checks:
    """A file's recorded ranges, [[offset, length, rank, checksum]...] from the index, checked to
    tile the file, and which of their blocks this open file has checked."""

    def __init__(self, path: str, recorded: Sequence, size: int):
        self.path = path
        self.unknown: list[str] = []  # ranges whose checksum algorithm this reader lacks
        ranges = []
        try:
            raw = sorted((int(b), int(n), rank, c) for b, n, rank, c in recorded)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the index's recorded ranges are malformed: {e!r}") from None
        pos = 0
        for b, n, rank, c in raw:
            if b != pos or n <= 0:
                raise CheckpointError(f"{path}: the index's recorded ranges do not tile the file (gap or overlap at "
                                      f"byte {pos})")
            where = (f"{path}: the checksum the index records for bytes [{b}, {b + n}) (field "
                     f"metadata.{fmt.META_KEY}.files[{os.path.basename(path)!r}])")
            try:
                rec = parse(c, b, b + n) if c else None
            except ValueError as e:
                if not str(e).startswith("unknown checksum algorithm"):
                    raise CheckpointError(f"{where}: {e}") from None
                # a later writer's algorithm: verify() refuses it, a load reads the range unchecked
                self.unknown.append(f"{where}: {e}")
                rec = None
            except RuntimeError as e:
                raise CheckpointError(f"{path}: {e}") from None
            ranges.append((b, b + n, rank, rec))
            pos = b + n
        if pos != size:
            raise CheckpointError(f"{path}: the file has {size} bytes but its recorded ranges cover {pos}; the file "
                                  "is damaged (or truncated)")
        self.ranges = ranges
        self.starts = [r[0] for r in ranges]
        self.done: set = set()
        if self.unknown:
            warnings.warn(f"{self.unknown[0]}: not checked (a newer dist_saver's checksums?)", DistSaverWarning,
                          stacklevel=2)

    def _blocks_of(self, i: int, a: int, b: int):
        """The blocks of range i overlapping [a, b)."""
        begin, end, rank, rec = self.ranges[i]
        if rec is None:
            return
        if rec.block is None:
            if (i, 0) not in self.done:
                yield _Block(begin, end, rec.digests[0], rank, (i, 0))
            return
        size = rec.block
        first = (begin // size + 1) * size  # end of block 0
        lo = max(a, begin)
        k = 0 if lo < first else (lo - first) // size + 1
        while True:
            start = begin if k == 0 else first + (k - 1) * size
            if start >= min(b, end):
                return
            stop = min(end, first + k * size)
            if (i, k) not in self.done:
                yield _Block(start, stop, rec.digests[k], rank, (i, k))
            k += 1

    def unchecked(self, items: list[Item]) -> list[_Block]:
        """The blocks not yet checked that the (sorted) items touch, in file order, each once."""
        out: list[_Block] = []
        seen = set()
        for it in items:
            a, b = it.offset, it.offset + it.nbytes
            if b <= a:
                continue
            i = bisect.bisect_right(self.starts, a) - 1
            while i < len(self.ranges) and self.ranges[i][0] < b:
                for blk in self._blocks_of(i, a, b):
                    if blk.key not in seen:
                        seen.add(blk.key)
                        out.append(blk)
                i += 1
        out.sort()
        return out

    def mark(self, blocks: list[_Block]) -> None:
        self.done.update(b.key for b in blocks)


class _BlockFeed:
    """Bytes read in file order -> the checksums of the blocks being checked."""

    def __init__(self, path: str, blocks: list[_Block]):
        self.path, self.blocks = path, blocks
        self.i = 0
        self.h: Hasher | None = None

    def feed(self, at: int, view) -> None:
        end = at + len(view)
        blocks = self.blocks
        while self.i < len(blocks):
            blk = blocks[self.i]
            if blk.start >= end:
                return
            lo, hi = max(at, blk.start), min(end, blk.stop)
            if hi <= lo:  # the block ends before these bytes (cannot happen: blocks are read in order)
                self.i += 1
                continue
            if self.h is None:
                if lo != blk.start:
                    raise AssertionError(f"block [{blk.start}, {blk.stop}) of {self.path} fed from {lo}")
                self.h = Hasher(_algorithm(blk))
            self.h.update(view[lo - at : hi - at])
            if hi < blk.stop:
                return
            actual = self.h.hexdigest()
            self.h = None
            self.i += 1
            if actual != blk.digest:
                raise CheckpointError(
                    f"{self.path}: checksum {_algorithm(blk)}:{actual} of bytes [{blk.start}, {blk.stop}) (written "
                    f"by rank {blk.rank}) does not match the recorded {blk.digest}; the file is damaged")

    def done(self) -> None:
        if self.i != len(self.blocks):
            blk = self.blocks[self.i]
            raise AssertionError(f"block [{blk.start}, {blk.stop}) of {self.path} was not read whole")


def _algorithm(blk: _Block) -> str:
    return "crc32" if len(blk.digest) == 8 else "xxh3_64"


def _parse_entry(path: str, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, data offset, bytes) of one header entry; anything malformed, or a tensor whose
    bytes do not fit its data_offsets (or no tensor torch can allocate), is a CheckpointError."""
    if entry.__class__ is dict:
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        dtype = fmt._CODE_TO_DTYPE.get(code) if code.__class__ is str else None
        # the common case in a few checks: plain ints, small enough for any tensor
        if (dtype is not None and shape.__class__ is list and offsets.__class__ is list and len(offsets) == 2
                and all(s.__class__ is int and 0 <= s < 1 << 31 for s in shape) and len(shape) <= 8
                and all(x.__class__ is int and x >= 0 for x in offsets)):
            n = dtype.itemsize * math.prod(shape)
            if offsets[1] - offsets[0] == n:
                return dtype, tuple(shape), offsets[0], n
    return _parse_entry_slowly(path, name, entry)


def _parse_entry_slowly(path: str, name: str, entry):
    where = f"{path}: header entry {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is a {type(entry).__name__}, not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str):
        raise CheckpointError(f"{where}: field dtype is {fmt.short_repr(code)}, not a safetensors dtype")
    try:
        dtype = fmt.torch_dtype(code)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: field dtype: {e}") from None
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{where}: field shape {fmt.short_repr(shape)} is not a list of non-negative integers")
    # torch sizes and strides are int64, even for an empty tensor: [2**40, 2**40, 0] is refused too
    if fmt.nbytes([max(1, s) for s in shape], dtype) >= 2**63:
        raise CheckpointError(f"{where}: field shape {fmt.short_repr(shape)} is too large for any tensor")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
        raise CheckpointError(f"{where}: field data_offsets {fmt.short_repr(offsets)} is not [begin, end]")
    begin, end = offsets
    n = fmt.nbytes(shape, dtype)
    if end - begin != n:
        raise CheckpointError(f"{where} ({code}{shape}, {n} bytes) has data offsets [{begin}, {end}] that do "
                              "not fit it")
    return dtype, tuple(shape), begin, n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


