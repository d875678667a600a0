"""Host copies of a rank's tensors for async saves: pinned for CUDA, reused from save to save."""

from __future__ import annotations

import threading

import torch

_cache: dict[str, torch.Tensor] = {}
_lock = threading.Lock()


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of tensors, taken now; returns when the copies are complete.

    Buffers from the previous snapshot are reused when name, shape and dtype match, so a
    steady training loop pays for allocation (and pinning) once, not at every checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    cuda = False
    with _lock:
        old = dict(_cache)
        _cache.clear()
        for name, t in tensors.items():
            buf = old.get(name)
            pin = t.device.type == "cuda"
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != pin:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            buf.copy_(t, non_blocking=pin)  # device-to-host copies queue up; one sync below
            cuda |= pin
            out[name] = _cache[name] = buf
    if cuda:
        torch.cuda.synchronize()
    return out


def release_snapshots() -> None:
    with _lock:
        _cache.clear()
