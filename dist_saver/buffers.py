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
    n = t.nbytes
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
    """Two bounce buffers, allocated on first use and reused, for blocks of a load that cannot be
    read straight into their target.

    For CUDA targets they are pinned and each block's host-to-device copy runs on a side stream,
    so the read of the next block (into the other buffer) overlaps it; a buffer is refilled only
    after its last copy finished. finish() waits for every copy (targets ready when a load returns).
    """

    def __init__(self, nbytes: int = 32 << 20):
        self.nbytes = nbytes
        self._bufs: list[torch.Tensor] = []
        self._pinned = False
        self._turn = 0
        self._done: list = [None, None]  # CUDA event of each buffer's last copy
        self._streams: dict = {}  # device -> side stream
        self._ordered: set = set()  # devices whose side stream waited for the caller's stream in this load

    def get(self, pinned: bool, nbytes: int | None = None) -> torch.Tensor:
        """The next buffer, free to overwrite: at least nbytes (default: all nbytes of it).

        Host buffers grow to what is asked (in MiB, up to nbytes): a load that stages only a
        header or a few small blocks does not touch 64 MiB of fresh memory (slow here: 0.3-0.6
        GB/s on first touch). Pinned ones are made whole at once (the double buffer of uploads)."""
        pinned = pinned and torch.cuda.is_available()
        want = self.nbytes if pinned or nbytes is None else min(self.nbytes, max(1, -(-nbytes // (1 << 20))) << 20)
        have = self._bufs[0].numel() if self._bufs else 0
        if not self._bufs or (pinned and not self._pinned) or have < want:
            self.finish()
            self._bufs = [aligned_empty(max(want, have), pinned) for _ in range(2)]
            self._pinned = pinned
        self._turn ^= 1
        done, self._done[self._turn] = self._done[self._turn], None
        if done is not None:
            done.synchronize()
        return self._bufs[self._turn]

    def upload(self, dst: torch.Tensor, block: torch.Tensor, index=None) -> None:
        """dst.copy_(block[index]), block being a contiguous view of the buffer get() gave last.

        CUDA dst: block goes to the device whole (one DMA, asynchronous) and is indexed there, on
        the side stream; anything else is copied at once."""
        if dst.device.type != "cuda" or not self._pinned:
            dst.copy_(block if index is None else block[index])
            return
        stream = self._streams.get(dst.device)
        if stream is None:
            stream = self._streams[dst.device] = torch.cuda.Stream(device=dst.device)
        if dst.device not in self._ordered:  # the caller's earlier work on the targets comes first
            stream.wait_stream(torch.cuda.current_stream(dst.device))
            self._ordered.add(dst.device)
        with torch.cuda.stream(stream):
            if index is None:
                dst.copy_(block, non_blocking=True)
            else:
                dst.copy_(block.to(dst.device, non_blocking=True)[index])
            done = torch.cuda.Event()
            done.record(stream)
        self._done[self._turn] = done

    def finish(self) -> None:
        """Every copy issued so far has finished."""
        for stream in self._streams.values():
            stream.synchronize()
        self._done = [None, None]
        self._ordered.clear()


_local = threading.local()


def staging_buffer() -> StagingBuffer:
    """This thread's staging buffers, kept for the life of the process (loads start warm)."""
    buf = getattr(_local, "staging", None)
    if buf is None:
        buf = _local.staging = StagingBuffer()
    return buf


def scratch(name: str, nbytes: int, pinned: bool = False) -> torch.Tensor:
    """A reused uint8 buffer of at least nbytes for this thread (grown, never shrunk); the first
    nbytes of it are returned."""
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    pinned = pinned and torch.cuda.is_available()
    buf = cache.get((name, pinned))
    if buf is None or buf.numel() < nbytes:
        buf = cache[(name, pinned)] = aligned_empty(max(nbytes, 1), pinned)
    return buf[:nbytes]


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
