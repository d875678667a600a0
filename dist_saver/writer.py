"""Writes byte ranges of planned files in place: the owner creates each file (header, size), then
every rank streams its own ranges into it at their offsets, concurrently with the other ranks.

Bytes go through a small pool of aligned, reused buffers: the caller's thread copies tensor blocks
in (from CPU memory, any strides, or from the GPU on a side stream), one writer thread checksums
and writes full buffers out, so copying the next buffer overlaps writing the last. Large stable
contiguous host tensors skip the pool: the writer thread writes them from their own memory.

By default (Streamer's direct_io=False, as dist_save's) every byte goes through the page cache,
with writeback started as each buffer lands and the dirty tail bounded (_Writeback). The writer
thread hashes and writes a slice at a time, each slice ending at a file offset that is a multiple
of 1 MiB (checksum.BLOCK_BYTES: each slice lies in one checksum block), so each byte is read from
memory once (measured, 2 ranks on tmpfs: replicated 0.35 s against 0.45 s when the filling thread
hashed). With direct_io=True, where the file system takes O_DIRECT (elsewhere the default path is
used): buffers map to block-aligned file offsets, the aligned middle of each range is written with
O_DIRECT and only its unaligned edges (the pages it shares with a neighbour's range) through the
page cache, and no tensor is written from its own memory. Extra memory: the pool, never a tensor.

Every system call on the files goes through a FileOps object, which fault tests substitute.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch

from . import format as fmt
from .buffers import ALIGN, as_bytes, shared_pool
from .checksum import BLOCK_BYTES, BlockHasher

DEFAULT_BUFFER_BYTES = 16 << 20
DEFAULT_BUFFER_COUNT = 4
# O_DIRECT writes cover whole pages of this size; a page shared with a neighbour's range is written
# through the page cache (never one page both ways: 64 KiB-page kernels included).
_EDGE = max(ALIGN, mmap.PAGESIZE)
# Page-cache writes hash and write a slice at a time, so the bytes are read from memory once; the
# slices end at file offsets that are multiples of this (a checksum block: one digest per slice).
_HASH_SLICE = BLOCK_BYTES
# Stable contiguous host tensors at least this large are written from their own memory (no copy
# into the pool); smaller ones are gathered into buffers, so the writes stay large.
IN_PLACE_MIN_BYTES = 1 << 20
# Buffered (non-O_DIRECT) files keep at most this many bytes dirty: see _Writeback.
WRITEBACK_LAG_BYTES = 64 << 20


def _sync_file_range():
    try:  # Linux (glibc, musl); elsewhere buffered files are written back by the final fsync only
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _sync_file_range()
# sync_file_range's flags
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4
# memmove(dst, src, n) for RangeStream.put_many's small copies. It releases the GIL, which lets the
# writer thread run between two copies (measured, 50,000 tensors of 4 KiB: 0.11 s, against 0.16 s
# with a memmove that keeps the GIL, the writer thread then waiting for it).
_memmove = ctypes.memmove


class FileOps:
    """The system calls a Streamer makes on its files, and its writeback lag, in one object.

    A fault test substitutes a subclass: Streamer(ops=...), or for the Streamers that dist_save
    makes, `with using_file_ops(ops):`, instead of patching os or this module.
    """

    def __init__(self, writeback_lag: int = WRITEBACK_LAG_BYTES):
        self.writeback_lag = writeback_lag  # see _Writeback
        # Linux has sync_file_range; elsewhere buffered files are written back by the final fsync only
        self.can_writeback = _SYNC_FILE_RANGE is not None

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def pwrite(self, fd: int, view: memoryview, offset: int) -> int:
        return os.pwrite(fd, view, offset)

    def write_all(self, fd: int, view: memoryview, offset: int) -> None:
        while view:  # pwrite may write less than asked
            k = self.pwrite(fd, view, offset)
            view, offset = view[k:], offset + k

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def sync_file_range(self, fd: int, offset: int, nbytes: int, flags: int) -> None:
        """Raises OSError as the call fails (only called where can_writeback)."""
        if _SYNC_FILE_RANGE(fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sync_file_range: {os.strerror(err)}")

    def drop_cached(self, fd: int, offset: int, nbytes: int) -> None:
        """Written-back bytes [offset, offset + nbytes) need not stay in the page cache."""
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


_substitute_ops: FileOps | None = None


@contextlib.contextmanager
def using_file_ops(ops: FileOps):
    """Streamers made inside the block without an ops argument (dist_save's) use ops."""
    global _substitute_ops
    previous, _substitute_ops = _substitute_ops, ops
    try:
        yield ops
    finally:
        _substitute_ops = previous


class _Writeback:
    """A buffered file's writeback, started as each buffer lands, with a bounded dirty tail.

    Without it the kernel writes nothing of a checkpoint-sized file before the final fsync (it
    stays under dirty_background_ratio, and dirty pages expire after 30 s): the disk idles while
    tensors are produced, then writes the whole file while we wait. Measured (2.15 GB, one
    process, 2-core VM): 3.72 s median before, 1.04 s with this, O_DIRECT 1.11 s. Ranges more
    than the lag (FileOps.writeback_lag: WRITEBACK_LAG_BYTES) behind are waited for and dropped
    from the page cache, so a save touches only ~lag bytes of fresh page-cache memory (as O_DIRECT,
    the file is not left cached).
    """

    def __init__(self, ops: FileOps, fd: int, start: int = 0):
        self.ops, self.fd, self.lag = ops, fd, ops.writeback_lag
        self.started = start  # writeback started for [start, started)
        self.done = start  # on disk and dropped: [start, done)
        self.on = ops.can_writeback

    def _range(self, begin: int, end: int, flags: int) -> None:
        self.ops.sync_file_range(self.fd, begin, end - begin, flags)

    def wrote(self, end: int) -> None:
        """Bytes [start, end) are in the page cache (called in file order, from the writer thread)."""
        if not self.on or end <= self.started:
            return
        try:
            self._range(self.started, end, SFR_WRITE)
            self.started = end
            if end - self.done > self.lag:
                upto = end - self.lag
                self._range(self.done, upto, SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER)
                self.ops.drop_cached(self.fd, self.done, upto - self.done)
                self.done = upto
        except OSError as e:
            if e.errno in _UNSUPPORTED:  # a hint this file system does not take: fsync does it all
                self.on = False
                return
            # A write error (EIO, ENOSPC...): the waiting call has now reported it, and the kernel
            # would not report it again to the final fsync, so it must fail the save here.
            raise


_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP}


@dataclass
class WrittenRange:
    """Bytes [begin, end) of one file, as a rank actually wrote them: checked against the plan
    before the index is published, and recorded in it with their checksum."""

    file: str  # the file's name in the checkpoint directory
    begin: int  # file offsets
    end: int
    rank: int
    checksum: str = ""  # block checksums of these bytes ("<algorithm>@<block>:<hex>..."), as written
    direct_io: bool = False


class _OpenFile:
    """This rank's descriptors of one file: page-cache writes, and O_DIRECT ones if asked for."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd, self.direct = path, fd, -1


class _Job(NamedTuple):
    """Write buf[lo:hi] at file offset base + lo (buf[0] sits at the block-aligned offset base):
    what a filling thread hands the writer thread."""

    file: _OpenFile
    base: int
    lo: int
    hi: int
    buf: torch.Tensor
    hasher: BlockHasher | None  # the range's running checksum, fed in file order (None: checksums off)
    event: object  # a CUDA event the copies into buf are waited on, or None
    writeback: _Writeback | None
    pooled: bool = True  # buf is the pool's (else the caller's own tensor, written in place)


def _pieces(job: _Job) -> list[tuple[int, int, int]]:
    """(descriptor, lo, hi) of each write that puts buf[job.lo:job.hi] on file, in file order."""
    f, base = job.file, job.base
    if f.direct < 0:  # a slice at a time: written while still in the CPU's cache from hashing it;
        # cut at the file offsets that are multiples of _HASH_SLICE (base may be any offset)
        first = min(job.hi, (base + job.lo) // _HASH_SLICE * _HASH_SLICE + _HASH_SLICE - base)
        cuts = [job.lo, *range(first, job.hi, _HASH_SLICE), job.hi]
        return [(f.fd, x, y) for x, y in zip(cuts, cuts[1:]) if x < y]
    # O_DIRECT for whole pages (one large request); the pages shared with a neighbour's range
    # through the page cache
    start, stop = base + job.lo, base + job.hi
    a = min(stop, -(-start // _EDGE) * _EDGE)
    b = max(a, stop // _EDGE * _EDGE)
    return [(fd, x - base, y - base) for fd, x, y in ((f.fd, start, a), (f.direct, a, b), (f.fd, b, stop)) if x < y]


class _WriterThread:
    """Writes jobs in order (from any number of filling threads); returns buffers to the pool.
    The one place where written bytes are hashed, whatever their source (CPU or CUDA tensors,
    pooled or in place): each piece just before its write."""

    def __init__(self, pool, ops: FileOps, on_written: Callable[[int], None] | None = None):
        self.pool, self.ops = pool, ops
        self.on_written = on_written  # progress: the file bytes each write made
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dist_saver-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.jobs.task_done()
                return
            try:
                if self.error is None:
                    self._write(job)
            except BaseException as e:  # reported to the caller at its next put/finish
                self.error = e
            finally:
                if job.pooled:
                    self.pool.give(job.buf)
                self.jobs.task_done()

    def _write(self, job: _Job) -> None:
        if job.event is not None:
            job.event.synchronize()  # the device-to-host copies into buf are done
        view = as_bytes(job.buf)
        try:
            for fd, lo, hi in _pieces(job):
                if job.hasher is not None:
                    job.hasher.update(view[lo:hi], job.base + lo)
                self.ops.write_all(fd, view[lo:hi], job.base + lo)
            if job.writeback is not None:
                job.writeback.wrote(job.base + job.hi)
        except OSError as e:  # a failed write() names no file: say which, and where
            raise OSError(e.errno, f"writing bytes [{job.base + job.lo}, {job.base + job.hi}) of {job.file.path}: "
                                   f"{e.strerror or e}") from e
        if self.on_written is not None:
            self.on_written(job.hi - job.lo)

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def drain(self) -> None:
        self.jobs.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class Streamer:
    """One per save and rank: the buffer pool, the writer thread, the CUDA side stream, and this
    rank's open files. Thread-safe: several threads may stream ranges at once.

    direct_io: O_DIRECT for the aligned middle of each range, where the file system takes it.
    ops: the FileOps every call on the files goes through (default: the one using_file_ops
    installed, else FileOps()).
    """

    def __init__(self, buffer_bytes: int = DEFAULT_BUFFER_BYTES, count: int = DEFAULT_BUFFER_COUNT,
                 cuda: bool = False, direct_io: bool = False, checksums: bool = True,
                 on_written: Callable[[int], None] | None = None, rank: int = 0, ops: FileOps | None = None):
        if buffer_bytes % ALIGN:
            raise ValueError(f"buffer size must be a multiple of {ALIGN}")
        self.ops = ops or _substitute_ops or FileOps()
        self.pool = shared_pool(count, buffer_bytes, pinned=cuda)
        self.writer = _WriterThread(self.pool, self.ops, on_written)
        self.stream = torch.cuda.Stream() if cuda and torch.cuda.is_available() else None
        if self.stream is not None:  # copies must see what the training stream wrote
            self.stream.wait_stream(torch.cuda.current_stream())
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self.checksums = checksums
        self.rank = rank
        self._files: dict[str, _OpenFile] = {}
        self._pending: list[tuple[WrittenRange, BlockHasher]] = []  # checksums known after the drain
        self._lock = threading.Lock()

    def create(self, path: str, header: bytes, size: int) -> WrittenRange:
        """As the file's owner: create it with its header and its final size, before anyone writes."""
        try:
            fd = self.ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with self._lock:
                self._files[path] = _OpenFile(path, fd)
            self.ops.write_all(fd, memoryview(header), 0)
            self.ops.ftruncate(fd, size)
        except OSError as e:
            raise self._failed("creating", path, e) from e
        checksum = ""
        if self.checksums:
            h = BlockHasher(0, len(header))
            h.update(header, 0)
            checksum = h.digest()
        return WrittenRange(os.path.basename(path), 0, len(header), self.rank, checksum)

    def _failed(self, doing: str, path: str, e: OSError) -> OSError:
        """e, naming the file and this rank."""
        return OSError(e.errno, f"{doing} {path} on rank {self.rank}: {e.strerror or e}")

    def _file(self, path: str) -> _OpenFile:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _OpenFile(path, self.ops.open(path, os.O_WRONLY))
            if self.direct_io and f.direct < 0:
                try:
                    f.direct = self.ops.open(path, os.O_WRONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self.direct_io = False  # e.g. tmpfs: remember, don't retry per file
            return f

    def open_range(self, path: str, begin: int, end: int) -> "RangeStream":
        """A stream of exactly the bytes [begin, end) of the (created) file at path."""
        try:
            f = self._file(path)
        except OSError as e:
            raise self._failed("opening", path, e) from e
        return RangeStream(self, f, begin, end)

    def finish(self) -> None:
        """Wait for every write, make this rank's writes durable (fsync each file it wrote into),
        close the files; fills in the checksums of the ranges closed so far (hashed on the writer
        thread)."""
        self.writer.drain()
        with self._lock:
            files, self._files = self._files, {}
        try:
            for f in files.values():
                try:
                    self.ops.fsync(f.fd)
                except OSError as e:
                    raise self._failed("writing", f.path, e) from e
        finally:
            _close(self.ops, files.values())
        for rng, hasher in self._pending:
            rng.checksum = hasher.digest()
        self._pending = []

    def close(self) -> None:
        self.writer.stop()
        with self._lock:
            files, self._files = self._files, {}
        _close(self.ops, files.values())

    def __enter__(self) -> "Streamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(ops: FileOps, files) -> None:
    for f in files:
        for fd in (f.fd, f.direct):
            if fd >= 0:
                ops.close(fd)


class RangeStream:
    """Sequential bytes into [begin, end) of one file through the pool; put() copies, the writer
    thread writes. Buffers sit at block-aligned file offsets (the first one starts part-way)."""

    def __init__(self, streamer: Streamer, file: _OpenFile, begin: int, end: int):
        self.s, self.file, self.begin, self.end = streamer, file, begin, end
        self.base = 0  # file offset of the current buffer's first byte (block-aligned)
        self.start = 0  # first byte of the current buffer that belongs to this range
        self.buf: torch.Tensor | None = None
        self.pos = 0  # bytes filled in the current buffer
        self.written = 0
        self.pending_device_copy = False
        # fed by the writer thread, in file order (it writes one range's jobs in order)
        self.hasher = BlockHasher(begin, end) if streamer.checksums else None
        self.writeback = None if file.direct >= 0 else _Writeback(streamer.ops, file.fd, begin)
        self._scratch: torch.Tensor | None = None

    def _space(self) -> int:
        if self.buf is None:
            if self.s.writer.error is not None:
                raise self.s.writer.error
            self.buf = self.s.pool.take()
            offset = self.begin + self.written
            self.base = offset - offset % ALIGN
            self.start = self.pos = offset - self.base
        return min(self.buf.numel() - self.pos, self.end - self.begin - self.written)

    def _flush(self) -> None:
        event = None
        if self.pending_device_copy:
            event = torch.cuda.Event()
            event.record(self.s.stream)
            self.pending_device_copy = False
        self.s.writer.submit(_Job(self.file, self.base, self.start, self.pos, self.buf, self.hasher, event,
                                  self.writeback))
        self.buf = None

    def _put_in_place(self, flat: torch.Tensor) -> None:
        """Have the writer thread write a stable host tensor's bytes straight from its memory: no
        copy into the pool (page-cache writes only; O_DIRECT needs the pool's aligned buffers)."""
        if self.buf is not None:
            self._flush()  # what the current buffer holds goes first
        step = self.s.pool.nbytes  # per job, so the writeback stays as fine-grained as with buffers
        for i in range(0, flat.numel(), step):
            part = flat[i : i + step]
            offset = self.begin + self.written
            self.s.writer.submit(_Job(self.file, offset, 0, part.numel(), part, self.hasher, None,
                                      self.writeback, pooled=False))
            self.written += part.numel()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stable: bool) -> None:
        if src.device.type == "cuda" and self.s.stream is not None:
            with torch.cuda.stream(self.s.stream):
                dst.copy_(src, non_blocking=True)
            if stable:
                self.pending_device_copy = True
            else:  # src is a reused buffer: the copy must finish before the caller reuses it
                self.s.stream.synchronize()
        else:
            dst.copy_(src)

    def _check_room(self, n: int) -> None:
        if self.written + n > self.end - self.begin:
            raise OSError(f"{self.file.path}: {self.written + n} bytes put into a range of "
                          f"{self.end - self.begin} [{self.begin}, {self.end})")

    def put(self, t: torch.Tensor, stable: bool = True, dtype: torch.dtype | None = None) -> int:
        """Append t's bytes (row-major), cast to dtype if given (dist_save(dtype=): while copying
        into the pool, never a copy of the tensor). stable: t stays unchanged until the range is
        closed."""
        if t.numel() == 0:
            return 0
        dtype = dtype or t.dtype
        item = dtype.itemsize
        n_total = t.numel() * item
        self._check_room(n_total)
        cast = dtype != t.dtype
        raw = not cast and t.is_contiguous() and not t.is_neg()  # its memory holds its bytes
        if raw and stable and t.device.type == "cpu" and n_total >= IN_PLACE_MIN_BYTES and self.file.direct < 0:
            self._put_in_place(t.reshape(-1).view(torch.uint8))
            return n_total
        if raw:
            flat = t.reshape(-1).view(torch.uint8)
            i = 0
            while i < n_total:
                k = min(self._space(), n_total - i)
                self._copy(self.buf[self.pos : self.pos + k], flat[i : i + k], stable)
                self._advance(k)
                i += k
            return n_total
        t = t if t.dim() else t.reshape(1)
        row = t[0].numel() * item
        start = 0
        while start < t.shape[0]:
            fit = self._space() // row
            if fit == 0:  # one row does not fit in what is left: split the row
                self.put(t[start], stable, dtype)
                start += 1
                continue
            block = t[start : start + fit]
            k = block.shape[0] * row
            dst = self.buf[self.pos : self.pos + k].view(dtype).view(block.shape)
            self._copy(dst, block, stable)  # copy_ makes the strided block contiguous (and cast) in place
            self._advance(k)
            start += block.shape[0]
        return n_total

    def put_many(self, items: Iterable[tuple[torch.Tensor, torch.dtype | None]], stable: bool = True) -> int:
        """put(t, stable, dtype) of each (t, dtype) in order; returns the bytes appended.

        A run of small tensors (10^5 experts) costs a few attribute reads and one memmove each:
        a contiguous CPU tensor saved in its own dtype that fits in the current buffer is copied
        there without making any tensor view; the rest go through put()."""
        total = 0
        room = self.end - self.begin
        small = IN_PLACE_MIN_BYTES if self.file.direct < 0 else 1 << 62  # O_DIRECT: everything is pooled
        buf, addr, size = None, 0, 0
        for t, dtype in items:
            n = t.nbytes
            if not n:
                continue
            if (n < small and t.is_cpu and (dtype is None or dtype == t.dtype) and t.is_contiguous()
                    and not t.is_neg()):  # a negative-bit view's memory holds -t
                if self.buf is None:
                    self._space()  # takes a buffer (or raises the writer's error)
                if self.buf is not buf:
                    buf, addr, size = self.buf, self.buf.data_ptr(), self.buf.numel()
                pos, written = self.pos, self.written + n
                if pos + n <= size and written <= room:
                    _memmove(addr + pos, t.data_ptr(), n)
                    self.pos, self.written = pos + n, written
                    total += n
                    if pos + n == size or written == room:
                        self._flush()
                    continue
            total += self.put(t, stable, dtype)
        return total

    def put_rows(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                 fill: Callable[[torch.Tensor, int, int], None]) -> int:
        """Append `rows` rows built in place: fill(dst, r0, r1) writes rows [r0, r1) into dst, a
        (r1 - r0, *row_shape) view of the buffer. No intermediate copy of the rows."""
        row = fmt.nbytes(row_shape, dtype)
        self._check_room(rows * row)
        r = 0
        while r < rows:
            fit = self._space() // row
            if fit == 0:  # a row straddles two buffers: build it aside, then copy its bytes
                if self._scratch is None or self._scratch.numel() < row:
                    self._scratch = torch.empty(row, dtype=torch.uint8)
                one = self._scratch[:row]
                fill(one.view(dtype).view((1,) + tuple(row_shape)), r, r + 1)
                self.put(one, stable=False)
                r += 1
                continue
            k = min(fit, rows - r)
            fill(self.buf[self.pos : self.pos + k * row].view(dtype).view((k,) + tuple(row_shape)), r, r + k)
            self._advance(k * row)
            r += k
        return rows * row

    def put_bytes(self, data: bytes) -> None:
        self.put(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def _advance(self, k: int) -> None:
        self.pos += k
        self.written += k
        if self.pos == self.buf.numel() or self.written == self.end - self.begin:
            self._flush()

    @contextlib.contextmanager
    def returning_buffers(self):
        """On an error, give the buffer being filled back to the pool (it is the process's, shared
        by later saves: a leaked buffer would make a later save wait for it forever)."""
        try:
            yield self
        except BaseException:
            if self.buf is not None:
                self.s.pool.give(self.buf)
                self.buf = None
            raise

    def close(self) -> WrittenRange:
        """Hand the last buffer to the writer; the range is durable after Streamer.finish()."""
        if self.buf is not None:
            self._flush()
        if self.written != self.end - self.begin:
            raise OSError(f"{self.file.path}: wrote {self.written} of the {self.end - self.begin} bytes "
                          f"of range [{self.begin}, {self.end}) on rank {self.s.rank}")
        rng = WrittenRange(os.path.basename(self.file.path), self.begin, self.end, self.s.rank,
                           direct_io=self.file.direct >= 0)
        if self.hasher is not None:  # its checksum is known once the writer thread is done
            with self.s._lock:
                self.s._pending.append((rng, self.hasher))
        return rng
