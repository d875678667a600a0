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
import ctypes
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
        entries = self._entries = {}
        path = self.path
        fast = _FAST_DTYPES
        pos = 0  # where the data read so far ends, while the entries come in data order, gapless
        in_order = True
        for name, entry in self.header.items():
            if name == "__metadata__":
                continue
            # the common case in a few checks: plain ints, small enough for any tensor (anything
            # else, or any exception here, goes to _parse_entry_slowly, which names what is wrong)
            try:
                if entry.__class__ is dict:
                    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
                    if code.__class__ is str and shape.__class__ is list and offsets.__class__ is list:
                        dtype, n = fast[code]
                        begin, end = offsets
                        for s in shape:  # dims of 0 (no bytes: any offsets fit) go the slow way
                            if s.__class__ is not int or s <= 0:
                                break
                            n *= s
                        else:
                            if (begin.__class__ is int and end.__class__ is int and begin >= 0 and end - begin == n
                                    and n < 1 << 63):
                                entries[name] = (dtype, tuple(shape), begin)
                                if begin == pos:
                                    pos = end
                                else:
                                    in_order = False
                                continue
            except (KeyError, ValueError):  # a field missing, an unknown dtype, offsets not two
                pass
            dtype, shape, begin, n = _parse_entry_slowly(path, name, entry)
            entries[name] = (dtype, shape, begin)
            if begin == pos:
                pos = begin + n
            else:
                in_order = False
        if not in_order or pos != self.size - self.data_start:
            self._check_tiling()  # raises, naming the first tensor (in data order) that is wrong

    def _check_tiling(self) -> None:
        path = self.path
        spans = sorted((begin, begin + fmt.nbytes(shape, dtype), name)
                       for name, (dtype, shape, begin) in self._entries.items())
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

    def entries(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        """{name: (dtype, shape, data offset)}, every tensor's entry as info() gives it but the
        offset relative to data_start (for planning many reads; the caller does not change it)."""
        return self._entries

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
        items: list = []
        outs = []
        entries, data_start = self._entries, self.data_start
        own = staging is None
        staging = staging or staging_buffer()
        chunk = min(READ_BATCH, staging.nbytes)
        pinned = False
        for i, (name, out, box) in enumerate(requests):
            outs.append(out)
            found = entries.get(name) if box is None else None
            # a whole tensor into contiguous CPU memory: one item
            if (found is not None and out.dtype == found[0] and out.shape == found[1] and out.is_cpu
                    and out.is_contiguous()):
                n = out.nbytes
                if n:
                    items.append((data_start + found[2], n, i, 0, None, None, None))
                continue
            (dtype, shape, start), offset, bshape = self._box(name, out, box)
            direct = out.is_cpu and out.is_contiguous()
            items += box_items(start, shape, dtype.itemsize, offset, bshape, direct, i, chunk)
            pinned = pinned or out.is_cuda
        try:
            return self.read_items(items, outs, staging, pinned)
        finally:
            if own:  # the caller's buffer is finished by the caller, before it uses the targets
                staging.finish()

    def read_items(self, items: Sequence[tuple], outs: Sequence[torch.Tensor], staging: StagingBuffer | None = None,
                   pinned: bool | None = None) -> int:
        """Read planned items (load_plan.Item, or plain tuples of its fields) into outs, items
        naming their target by its index there, in one sweep as read_many; returns the bytes read.

        The caller planned the items from this file's entries (info) for targets it checked to be
        their boxes' dtype and shape, direct items only for contiguous CPU targets: nothing is
        checked here but the bytes. pinned: whether an out is on CUDA (None: look). As read_many,
        staged CUDA copies may be in flight until staging.finish()."""
        before = self.bytes_read
        self._sweep(items, outs, staging, pinned)
        return self.bytes_read - before

    def verify(self) -> int:
        """Check every recorded block of the file (verify()); returns the bytes checked."""
        if self.checks is None:
            raise CheckpointError(f"{self.path}: opened without recorded checksums")
        if self.checks.unknown:
            raise CheckpointError(self.checks.unknown[0])
        self._sweep([(0, self.size, -1, 0, None, None, None)], [], None)
        return self.bytes_checked

    def _preadv(self, views: list, offset: int) -> None:
        """Fill views, in order, with the file's bytes from offset: every read of this file goes
        through here."""
        want = sum(map(len, views))
        try:
            got = os.preadv(self.fd, views, offset)
        except OSError as e:  # an unreadable checkpoint: its file and bytes named (read() names neither)
            raise CheckpointError(f"{self.path}: reading bytes [{offset}, {offset + want}) failed: "
                                  f"[Errno {e.errno}] {e.strerror or e}") from e
        if got != want:  # a regular file returns short only at its end
            raise CheckpointError(f"{self.path}: file is truncated (short read of bytes [{offset}, {offset + want}))")

    # Items are read by position (0 offset, 1 nbytes, 2 target, 3 at, 4 dst_box: load_plan.Item's
    # fields), so that plans may build plain tuples: a load of 100k tensors builds 100k of them.

    def _sweep(self, items: Sequence[tuple], outs: Sequence, staging: StagingBuffer | None,
               pinned: bool | None = None) -> None:
        """Read every item's bytes into its target in file order, with the unchecked blocks they
        touch (items of target -1 are read only to be checked)."""
        items = sorted(items)
        layers = [items]
        end = 0
        for it in items:
            if it[0] < end:  # items for different targets overlap (two targets of one tensor): later sweeps
                layers = _layers(items)
                break
            if it[0] + it[1] > end:
                end = it[0] + it[1]
        staging = staging or staging_buffer()
        if pinned is None:
            pinned = any(o.is_cuda for o in outs)
        for layer in layers:
            self._sweep_layer(layer, outs, staging, pinned)

    def _sweep_layer(self, items: list, outs: Sequence, staging: StagingBuffer, pinned: bool) -> None:
        checks = self.checks
        # runs of items that touch (begin, end, index of the first), then the blocks they need
        runs = []
        a = b = first = -1
        for k, it in enumerate(items):
            o = it[0]
            if o <= b:
                if o + it[1] > b:
                    b = o + it[1]
            else:
                if first >= 0:
                    runs.append((a, b, first))
                a, b, first = o, o + it[1], k
        if first >= 0:
            runs.append((a, b, first))
        blocks = checks.unchecked(runs) if checks is not None else []
        # the file spans to read: the runs, widened to the blocks they touch, merged
        spans: list[list] = []  # [begin, end, index of the first item]
        bi, nb = 0, len(blocks)
        for a, b, first in runs:
            while bi < nb and blocks[bi][1] <= a:
                bi += 1
            j = bi
            while j < nb and blocks[j][0] < b:
                if blocks[j][0] < a:
                    a = blocks[j][0]
                if blocks[j][1] > b:
                    b = blocks[j][1]
                j += 1
            if spans and a <= spans[-1][1]:
                if b > spans[-1][1]:
                    spans[-1][1] = b
            else:
                spans.append([a, b, first])
        feed = _BlockFeed(self.path, blocks)
        for i, (begin, end, first) in enumerate(spans):
            stop = spans[i + 1][2] if i + 1 < len(spans) else len(items)
            self._read_span(begin, end, items, first, stop, outs, staging, pinned, feed)
        feed.done()
        if checks is not None:
            checks.mark(blocks)
            self.bytes_checked += sum(blk.stop - blk.start for blk in blocks)

    def _read_span(self, begin: int, end: int, items: list, k: int, k_end: int, outs: Sequence,
                   staging: StagingBuffer, pinned: bool, feed: "_BlockFeed") -> None:
        """One contiguous file span holding items[k:k_end], in batches of at most READ_BATCH bytes:
        one vectored read, the checked blocks hashed, then the staged items copied into their
        targets. A batch's bytes that go to no target directly (gaps: bytes of blocks being
        checked; staged items) go to one staging buffer, one after another."""
        pos = begin
        limit = min(READ_BATCH, staging.nbytes)  # staged items are planned at most this large
        u8 = ctypes.c_uint8
        while pos < end:
            views: list = []
            copies: list = []  # (item, its bytes in the staging buffer)
            buf = raw = None  # the staging buffer (taken at its first use in the batch), its bytes
            used = 0  # bytes of it used
            start, total = pos, 0
            while pos < end and total < limit and len(views) < MAX_IOVECS:
                if k < k_end:
                    it = items[k]
                    o = it[0]
                else:
                    it, o = None, end
                if o > pos:  # a gap: bytes of a block being checked, staged
                    n = min(o, pos + limit - total) - pos
                    copy = None
                else:
                    stop, target = o + it[1], it[2]
                    if target < 0:  # read only to be checked, staged
                        n = min(stop - pos, limit - total)
                        copy = None
                    elif it[4] is None:  # straight into a contiguous CPU target
                        n = min(stop - pos, limit - total)
                        out = outs[target]
                        at = it[3] + pos - o
                        if at == 0 and n == out.nbytes:
                            views.append((u8 * n).from_address(out.data_ptr()))
                        else:
                            views.append(as_bytes(out)[at : at + n])
                        total += n
                        pos += n
                        if pos >= stop:
                            k += 1
                        continue
                    else:  # staged whole, then copied out
                        n = it[1]
                        if total and total + n > limit:
                            break
                        copy = it
                    if pos + n >= stop:
                        k += 1
                if raw is None:
                    buf = staging.get(pinned=pinned, nbytes=min(limit, end - start))
                    raw = as_bytes(buf)
                if used + n > len(raw):
                    raise AssertionError("a read batch outgrew the staging buffer")  # READ_BATCH is below its size
                views.append(raw[used : used + n])
                if copy is not None:
                    copies.append((copy, buf[used : used + n]))
                used += n
                total += n
                pos += n
            self._preadv(views, start)
            self.bytes_read += total
            feed.feed(start, views)
            for it, data in copies:
                _deliver(it, data, outs, staging)


def _layers(items: list) -> list[list]:
    """Sorted items in layers of items that do not overlap, each item in the first it fits."""
    layers: list[list] = [[]]
    for it in items:
        for layer in layers:
            if not layer or layer[-1][0] + layer[-1][1] <= it[0]:
                layer.append(it)
                break
        else:
            layers.append([it])
    return layers


def _deliver(it: tuple, data: torch.Tensor, outs: Sequence, staging: StagingBuffer) -> None:
    """Copy a staged item's bytes into its part of the target."""
    _, _, target, _, dst_box, src_shape, src_box = it
    out = outs[target]
    src = data.view(out.dtype).view(src_shape)
    dst = out[tuple(slice(o, o + s) for o, s in zip(*dst_box))] if dst_box[1] else out
    index = None if src_box is None else tuple(slice(o, o + s) for o, s in zip(*src_box))
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
        self.done: set = set()
        if self.unknown:
            warnings.warn(f"{self.unknown[0]}: not checked (a newer dist_saver's checksums?)", DistSaverWarning,
                          stacklevel=2)

    def unchecked(self, spans: Sequence[tuple]) -> list[_Block]:
        """The blocks not yet checked that the spans ((begin, end, ...): sorted, disjoint) touch,
        in file order, each once: one walk over spans and ranges together."""
        out: list[_Block] = []
        ranges, done = self.ranges, self.done
        nr = len(ranges)
        i = 0
        last_range, last_block = -1, -1  # the last block looked at: later spans start at or after it
        for sp in spans:
            a, b = sp[0], sp[1]
            if b <= a:
                continue
            while i < nr and ranges[i][1] <= a:
                i += 1
            j = i
            while j < nr and ranges[j][0] < b:
                begin, end, rank, rec = ranges[j]
                if rec is not None:
                    if rec.block is None:  # one digest of the whole range
                        k0 = k1 = 0
                    else:
                        size = rec.block
                        first = (begin // size + 1) * size  # end of block 0
                        lo, hi = max(a, begin), min(b, end) - 1
                        k0 = 0 if lo < first else (lo - first) // size + 1
                        k1 = 0 if hi < first else (hi - first) // size + 1
                    if j == last_range:
                        k0 = max(k0, last_block + 1)
                    for k in range(k0, k1 + 1):
                        if (j, k) not in done:
                            if rec.block is None:
                                out.append(_Block(begin, end, rec.digests[0], rank, (j, 0)))
                            else:
                                start = begin if k == 0 else first + (k - 1) * size
                                out.append(_Block(start, min(end, first + k * size), rec.digests[k], rank, (j, k)))
                    if k1 >= k0:
                        last_range, last_block = j, k1
                j += 1
        return out

    def mark(self, blocks: list[_Block]) -> None:
        self.done.update(b.key for b in blocks)


class _BlockFeed:
    """Bytes read in file order -> the checksums of the blocks being checked."""

    def __init__(self, path: str, blocks: list[_Block]):
        self.path, self.blocks = path, blocks
        self.i = 0
        self.h: Hasher | None = None

    def feed(self, at: int, views: Sequence) -> None:
        """The bytes of views, one after another from file offset at."""
        blocks = self.blocks
        i, h = self.i, self.h
        if i >= len(blocks):
            return
        blk = blocks[i]
        for view in views:
            end = at + len(view)
            if h is not None and end < blk.stop:  # inside the block being hashed
                h.update(view)
                at = end
                continue
            whole = None
            while blk.start < end:
                lo, hi = max(at, blk.start), min(end, blk.stop)
                if hi > lo:
                    if h is None:
                        if lo != blk.start:
                            raise AssertionError(f"block [{blk.start}, {blk.stop}) of {self.path} fed from {lo}")
                        h = Hasher(_algorithm(blk))
                    if lo == at and hi == end:
                        h.update(view)
                    else:
                        whole = memoryview(view) if whole is None else whole
                        h.update(whole[lo - at : hi - at])
                    if hi < blk.stop:
                        break
                    actual = h.hexdigest()
                    h = None
                    if actual != blk.digest:
                        self.i, self.h = i + 1, None
                        raise CheckpointError(
                            f"{self.path}: checksum {_algorithm(blk)}:{actual} of bytes [{blk.start}, {blk.stop}) "
                            f"(written by rank {blk.rank}) does not match the recorded {blk.digest}; the file is "
                            "damaged")
                # the block is done (or ended before these bytes, which cannot happen: blocks are read in order)
                i += 1
                if i == len(blocks):
                    self.i, self.h = i, None
                    return
                blk = blocks[i]
            at = end
        self.i, self.h = i, h

    def done(self) -> None:
        if self.i != len(self.blocks):
            blk = self.blocks[self.i]
            raise AssertionError(f"block [{blk.start}, {blk.stop}) of {self.path} was not read whole")


def _algorithm(blk: _Block) -> str:
    return "crc32" if len(blk.digest) == 8 else "xxh3_64"


# safetensors code -> (dtype, item size), for the per-entry checks of a header
_FAST_DTYPES = {code: (dtype, dtype.itemsize) for code, dtype in fmt._CODE_TO_DTYPE.items()}


def _parse_entry_slowly(path: str, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, data offset, bytes) of one header entry; anything malformed, or a tensor whose
    bytes do not fit its data_offsets (or no tensor torch can allocate), is a CheckpointError."""
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


