"""Host buffers that are allocated once and reused: page-aligned, touched, pinned for CUDA.

Fresh memory is expensive here (first touches ran at 0.3-0.6 GB/s on the development VM, against
10+ GB/s for memcpy into touched memory), and O_DIRECT needs aligned addresses, so every byte that
goes to disk passes through one of a few such buffers, kept for the life of the process.
"""

from __future__ import annotations

import ctypes
import threading

import torch

ALIGN = 4096


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the caller keeps t alive)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_uint8 * n).from_address(t.data_ptr())).cast("B")


def aligned_empty(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """A touched uint8 CPU tensor of nbytes whose address is a multiple of ALIGN."""
    pin = pinned and torch.cuda.is_available()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    buf = raw[skip : skip + nbytes]
    buf.fill_(0)  # touch every page now, not in the middle of a save
    return buf


class StagingBuffer:
    """One buffer, allocated on first use and reused, for blocks that need a bounce copy."""

    def __init__(self, nbytes: int = 64 << 20):
        self.nbytes = nbytes
        self._buf: torch.Tensor | None = None
        self._pinned = False

    def get(self, pinned: bool) -> torch.Tensor:
        if self._buf is None or (pinned and not self._pinned and torch.cuda.is_available()):
            self._buf = aligned_empty(self.nbytes, pinned)
            self._pinned = pinned and torch.cuda.is_available()
        return self._buf


class BufferPool:
    """A fixed set of equal aligned buffers handed out and returned (blocks when all are out)."""

    def __init__(self, count: int, nbytes: int, pinned: bool):
        self.nbytes = nbytes
        self.pinned = pinned and torch.cuda.is_available()
        self._free = [aligned_empty(nbytes, self.pinned) for _ in range(count)]
        self._cv = threading.Condition()

    def take(self, timeout: float = 600.0) -> torch.Tensor:
        with self._cv:
            if not self._cv.wait_for(lambda: self._free, timeout):
                raise TimeoutError(f"no write buffer came back within {timeout:.0f}s: the writes are stuck "
                                   "(a hung filesystem?) or a buffer was lost")
            return self._free.pop()

    def give(self, buf: torch.Tensor) -> None:
        with self._cv:
            self._free.append(buf)
            self._cv.notify()


_pools: dict[tuple, BufferPool] = {}
_pools_lock = threading.Lock()


def shared_pool(count: int, nbytes: int, pinned: bool) -> BufferPool:
    """The process's pool of this shape, made on first use and kept, so later saves start warm."""
    key = (count, nbytes, pinned and torch.cuda.is_available())
    with _pools_lock:
        if key not in _pools:
            _pools[key] = BufferPool(count, nbytes, pinned)
        return _pools[key]


def release_buffers() -> None:
    """Drop the cached pools (their memory returns once nothing else holds it)."""
    with _pools_lock:
        _pools.clear()
