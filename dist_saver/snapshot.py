"""Host copies of a rank's tensors for async saves: pinned for CUDA, reused from save to save."""

from __future__ import annotations

import threading

import torch

from . import memory
from .errors import SaveError

_cache: dict[str, torch.Tensor] = {}
_lock = threading.Lock()


def _reusable(buf: torch.Tensor | None, t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the previous snapshot's buffer can take t's copy (same shape, dtype and pinning)."""
    pin = t.device.type == "cuda"
    return buf is not None and buf.shape == t.shape and buf.dtype == dtype and buf.is_pinned() == pin


def snapshot(tensors: dict[str, torch.Tensor], dtypes: dict | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of tensors, taken now (cast to dtypes[name] where given: a save with
    dtype= snapshots what it writes); returns when the copies are complete.

    Buffers from the previous snapshot are reused when name, shape and dtype match, so a
    steady training loop pays for allocation (and pinning) once, not at every checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    cuda = False
    dtypes = dtypes or {}
    with _lock:
        old = dict(_cache)
        _cache.clear()
        for name, t in tensors.items():
            buf = old.get(name)
            pin = t.device.type == "cuda"
            dtype = dtypes.get(name, t.dtype)
            if not _reusable(buf, t, dtype):
                buf = torch.empty(t.shape, dtype=dtype, pin_memory=pin)
            buf.copy_(t, non_blocking=pin)  # device-to-host copies queue up; one sync below
            cuda |= pin
            out[name] = _cache[name] = buf
    if cuda:
        torch.cuda.synchronize()
    return out


def snapshot_bytes(tensors: dict[str, torch.Tensor], dtypes: dict | None = None) -> int:
    """Host bytes snapshot(tensors, dtypes) would allocate now: buffers it reuses are not counted."""
    dtypes = dtypes or {}
    with _lock:
        return sum(t.numel() * dtypes.get(name, t.dtype).itemsize for name, t in tensors.items()
                   if not _reusable(_cache.get(name), t, dtypes.get(name, t.dtype)))


def check_snapshot_fits(tensors: dict[str, torch.Tensor], rank: int, dtypes: dict | None = None) -> None:
    """Raise SaveError (naming rank, the bytes needed and those available) if snapshot(tensors)
    would not fit in the host memory available now (memory.available_bytes()): refused, rather
    than the process being killed for memory in the middle of a save."""
    needed = snapshot_bytes(tensors, dtypes)
    if needed == 0:
        return
    available = memory.available_bytes()
    if needed > available:
        raise SaveError(
            f"rank {rank}: an async save needs {needed} bytes ({needed / 1e9:.2f} GB) of host memory for the "
            f"snapshot of the tensors this rank writes, but only {available} bytes ({available / 1e9:.2f} GB) are "
            "available (psutil.virtual_memory().available); free host memory, or save with async_save=False, "
            "which writes from the tensors themselves")
