"""Streams one planned file to disk: header first, then each tensor's bytes in plan order.

CPU tensors that are contiguous are written from their own memory. Anything else (non-contiguous
views, GPU tensors) goes through one reused staging buffer, a block at a time, so the extra memory
is the buffer, never a tensor.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from . import format as fmt
from .plan import FilePlan

# os.write moves at most ~2 GiB per call; smaller pieces also keep the page cache flowing.
_MAX_WRITE = 64 << 20
DEFAULT_STAGING_BYTES = 64 << 20


@dataclass
class WrittenFile:
    """What a rank actually wrote: checked against the plan before the index is published."""

    name: str
    rank: int
    size: int  # bytes of the whole file
    tensors: dict[str, int] = field(default_factory=dict)  # name -> data bytes written
    seconds: float = 0.0


class StagingBuffer:
    """One byte buffer, allocated on first use and reused for every block of the save."""

    def __init__(self, nbytes: int = DEFAULT_STAGING_BYTES):
        self.nbytes = nbytes
        self._buf: torch.Tensor | None = None
        self._pinned = False

    def get(self, pinned: bool) -> torch.Tensor:
        if self._buf is None or (pinned and not self._pinned):
            pin = pinned and torch.cuda.is_available()
            self._buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
            self._pinned = pin
        return self._buf


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the caller keeps t alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_uint8 * n).from_address(t.data_ptr())).cast("B")


def tensor_chunks(t: torch.Tensor, staging: StagingBuffer) -> Iterator[memoryview]:
    """The bytes of t in row-major order, in pieces of at most the staging size."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        data = as_bytes(t)
        for start in range(0, len(data), _MAX_WRITE):
            yield data[start : start + _MAX_WRITE]
        return
    buf = staging.get(pinned=t.device.type == "cuda")
    yield from _staged(t, buf)


def _staged(t: torch.Tensor, buf: torch.Tensor) -> Iterator[memoryview]:
    if t.dim() == 0:
        t = t.reshape(1)
    row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
    if row_bytes > buf.numel():
        for row in t:  # one row is bigger than the buffer: split it further
            yield from _staged(row, buf)
        return
    rows = max(1, buf.numel() // max(row_bytes, 1))
    for start in range(0, t.shape[0], rows):
        block = t[start : start + rows]
        n = block.numel() * block.element_size()
        # copy_ makes the block contiguous (and moves it off the GPU) inside the reused buffer
        buf[:n].view(t.dtype).view(block.shape).copy_(block)
        yield as_bytes(buf[:n])


def write_file(
    path: str,
    plan: FilePlan,
    chunks_of: Callable[[str], Iterable[memoryview]],
    rank: int,
) -> WrittenFile:
    """Write plan's file at path; chunks_of(name) yields each tensor's bytes in order."""
    t0 = time.perf_counter()
    written: dict[str, int] = {}
    header = fmt.encode_header(plan.tensors)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(header))
        for entry in plan.tensors:
            n = 0
            for chunk in chunks_of(entry.name):
                n += _write_all(fd, chunk)
            written[entry.name] = n
            if n != entry.end - entry.begin:
                raise OSError(
                    f"tensor {entry.name!r}: wrote {n} bytes but the plan has {entry.end - entry.begin} "
                    f"(file {plan.name}, rank {rank})"
                )
        os.fsync(fd)
        size = os.fstat(fd).st_size
    except OSError as e:
        raise OSError(e.errno, f"writing {path} on rank {rank}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return WrittenFile(plan.name, rank, size, written, time.perf_counter() - t0)


def _write_all(fd: int, data: memoryview) -> int:
    total = len(data)
    while data:
        n = os.write(fd, data)
        data = data[n:]
    return total
