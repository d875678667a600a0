"""Reads boxes of tensors out of safetensors files with positioned reads, straight into the target.

Why not safetensors' own mmap + get_slice: on a cold cache its page faults pull in whole tensors
and more (kernel readahead; measured here: 56-64 MiB read from disk for a 16 MiB quarter of a
64 MiB tensor), so a rank loading 1/N of a model read most of it. With POSIX_FADV_RANDOM and one
pread per contiguous run, the disk sees the shard's bytes (16.0 MiB for that quarter), and a
contiguous CPU target is filled without an intermediate copy.
"""

from __future__ import annotations

import abc
import itertools
import math
import os
from typing import NamedTuple, Sequence

import torch

from . import format as fmt
from .errors import CheckpointError
from .buffers import StagingBuffer, as_bytes


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


def open_weights(path: str) -> WeightsFile:
    """A reader for one weights file: ShardFile for safetensors, LegacyFile for torch.save'd ones."""
    if fmt.is_legacy_file(path):
        from .legacy import LegacyFile

        return LegacyFile(path)
    return ShardFile(path)


class ShardFile(WeightsFile):
    """One open safetensors file: its validated header and positioned reads into tensors."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # no readahead: read the ranges asked for, no more
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.size = os.fstat(self.fd).st_size
            self.header, self.data_start = fmt.read_header(path, self.fd)
            self._check_layout()
        except BaseException:
            os.close(self.fd)
            raise
        self.bytes_read = 0

    def _check_layout(self) -> None:
        """Every entry well-formed and fitting the file, and the entries tiling the data region
        exactly, as the safetensors library requires: a header length smaller than the header
        (which would shift every tensor) leaves trailing bytes, a hole or overlap is damage."""
        self._entries = {}
        for name, entry in self.header.items():
            if name != "__metadata__":
                self._entries[name] = _parse_entry(self.path, name, entry)
        spans = sorted((begin, begin + fmt.nbytes(shape, dtype), name)
                       for name, (dtype, shape, begin) in self._entries.items())
        data = self.size - self.data_start
        pos, prev = 0, None
        for begin, end, name in spans:
            if end > data:
                raise CheckpointError(f"{self.path}: tensor {name!r} has data offsets [{begin}, {end}] that do not "
                                      f"fit the file ({self.size} bytes, data from byte {self.data_start})")
            if begin < pos:
                raise CheckpointError(f"{self.path}: tensors {prev!r} and {name!r} overlap in the file")
            if begin > pos:
                raise CheckpointError(f"{self.path}: data bytes [{pos}, {begin}) before tensor {name!r} belong to "
                                      "no tensor: the header's data_offsets are wrong")
            pos, prev = end, name
        if pos != data:
            raise CheckpointError(f"{self.path}: the tensors fill {pos} bytes of data but the header length field "
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

        out may live anywhere (CPU, CUDA, non-contiguous): blocks of rows that cannot be read
        into it directly go through the staging buffers (for CUDA: pinned, each block's copy to
        the device overlapping the read of the next; the caller calls staging.finish() before
        using out). Returns the bytes read.
        """
        (dtype, shape, start), offset, bshape = self._box(name, out, box)
        if out.numel() == 0:
            return 0
        if staging is None:
            staging = StagingBuffer()
            try:
                return self._read_box(out, start, offset, bshape, shape, dtype, staging)
            finally:
                staging.finish()
        return self._read_box(out, start, offset, bshape, shape, dtype, staging)

    def _pread(self, view: memoryview, offset: int) -> None:
        """Fill view with the file's bytes at offset: every read of this file goes through here."""
        got = os.preadv(self.fd, [view], offset)
        if got != len(view):
            raise CheckpointError(f"{self.path}: file is truncated (short read at byte {offset})")

    def _read_box(self, dst, start, off, bshape, shape, dtype, staging) -> int:
        nbytes = fmt.nbytes(bshape, dtype)
        row = fmt.nbytes(shape[1:], dtype)
        if shape and _run_length(shape, off, bshape, dtype.itemsize) < SMALL_RUN and row <= staging.nbytes:
            return self._read_whole_rows(dst, start, off, bshape, shape, dtype, staging, row)
        if (dst.device.type == "cpu" and dst.is_contiguous()) or nbytes <= staging.nbytes:
            return self._read_rows(dst, start, off, bshape, shape, dtype, staging)
        # Too big for the staging buffer: split along the first dim that can be split.
        d = next(i for i, s in enumerate(bshape) if s > 1)
        per = max(1, staging.nbytes // (nbytes // bshape[d]))
        n = 0
        for lo in range(0, bshape[d], per):
            k = min(per, bshape[d] - lo)
            sub_off = off[:d] + (off[d] + lo,) + off[d + 1 :]
            sub_shape = bshape[:d] + (k,) + bshape[d + 1 :]
            n += self._read_box(dst.narrow(d, lo, k), start, sub_off, sub_shape, shape, dtype, staging)
        return n

    def _read_whole_rows(self, dst, start, off, bshape, shape, dtype, staging, row) -> int:
        """Small runs (e.g. column shards of narrow rows): one sequential read of the box's whole
        rows per block, then a strided copy. Reads up to full-row/box-row times the box (2x for
        a 2-way column split) but replaces thousands of tiny random reads, which were ~10x
        slower here."""
        per = max(1, staging.nbytes // row)
        inner = tuple(slice(o, o + s) for o, s in zip(off[1:], bshape[1:]))
        n = 0
        for lo in range(0, bshape[0], per):
            k = min(per, bshape[0] - lo)
            buf = staging.get(pinned=dst.device.type == "cuda")[: k * row]
            self._pread(as_bytes(buf), start + (off[0] + lo) * row)
            full = buf.view(dtype).view((k,) + tuple(shape[1:]))
            staging.upload(dst.narrow(0, lo, k), full, (slice(None),) + inner)
            n += k * row
        self.bytes_read += n
        return n

    def _read_rows(self, dst, start, off, bshape, shape, dtype, staging) -> int:
        direct = dst.device.type == "cpu" and dst.is_contiguous()
        if direct:
            target = dst
        else:
            buf = staging.get(pinned=dst.device.type == "cuda")
            target = buf[: max(1, dst.numel()) * dtype.itemsize].view(dtype).view(dst.shape)
        view = as_bytes(target)
        pos = 0
        for file_offset, length in _runs(shape, off, bshape, dtype.itemsize):
            self._pread(view[pos : pos + length], start + file_offset)
            pos += length
        if not direct:
            staging.upload(dst, target)
        self.bytes_read += pos
        return pos


def _parse_entry(path: str, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of one header entry; anything malformed, or a tensor whose bytes
    do not fit its data_offsets (or no tensor torch can allocate), is a CheckpointError."""
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
    return dtype, tuple(shape), begin


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Below this many contiguous bytes per run, reading whole rows sequentially beats exact reads.
SMALL_RUN = 64 << 10


def _run_dim(shape, offset, bshape, item) -> tuple[int, int]:
    """(k, step): each contiguous run of the box is bshape[k] steps of `step` bytes along dim k,
    the last dim (0 at least) that the box does not cover fully; the dims after it merge in."""
    k = len(shape) - 1
    while k > 0 and offset[k] == 0 and bshape[k] == shape[k]:
        k -= 1
    return k, item * math.prod(shape[k + 1 :])


def is_one_run(shape, offset, bshape) -> bool:
    """Whether the box is one contiguous run of the tensor's row-major bytes (whole rows, or part
    of one row): every dim before the last partial one has extent 1."""
    k, _ = _run_dim(shape, offset, bshape, 1)
    return all(s == 1 for s in bshape[:k])


def _run_length(shape, offset, bshape, item) -> int:
    k, step = _run_dim(shape, offset, bshape, item)
    return bshape[k] * step if k > 0 else 1 << 62  # a range of whole rows is one run however short


def _runs(shape: Sequence[int], offset: Sequence[int], bshape: Sequence[int], item: int):
    """(byte offset in the tensor, length) of each contiguous run of the box, in row-major order."""
    if not shape:
        yield 0, item
        return
    k, inner = _run_dim(shape, offset, bshape, item)
    strides = [0] * len(shape)
    acc = item
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    length = bshape[k] * inner
    base = offset[k] * inner
    for idx in itertools.product(*(range(o, o + s) for o, s in zip(offset[:k], bshape[:k]))):
        yield base + sum(i * st for i, st in zip(idx, strides)), length
