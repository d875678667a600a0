"""Reading legacy PyTorch weights (pytorch_model.bin, or shards listed in pytorch_model.bin.index.json).

We read this format, never write it. torch.load(weights_only=True) refuses to unpickle anything
but tensors and plain containers, so a hostile file cannot run code; mmap=True maps the storages,
so a rank touches only the bytes it copies out.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .errors import CheckpointError
from .reader import TensorEntry, WeightsFile

log = logging.getLogger("dist_saver")


class LegacyFile(WeightsFile):
    """One torch.save'd state dict, with ShardFile's reading interface."""

    def __init__(self, path: str):
        self.path = path
        self.bytes_read = 0
        try:
            obj = _load(path, mmap=True)
        except _NotMappable:
            # Files from before torch 1.6's zip format cannot be mapped: read them whole.
            log.warning("%s: old (non-zip) torch.save format, loading it whole into memory", path)
            obj = _load(path, mmap=False)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        self.tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        skipped = [k for k in obj if k not in self.tensors]
        if not self.tensors:
            raise CheckpointError(
                f"{path}: holds no tensors at its top level (keys: {[str(k) for k in list(obj)[:10]]}); "
                "a training checkpoint often nests the weights, e.g. under 'model' or 'state_dict': "
                "save that dict on its own to load or convert it")
        if skipped:
            log.warning("%s: skipping %d non-tensor entries: %s", path, len(skipped), skipped[:10])

    def close(self) -> None:
        self.tensors = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorEntry:
        """(dtype, shape, None): a zip archive's storages have no file offset we read from."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this file")
        return TensorEntry(t.dtype, tuple(t.shape), None)

    def ties(self) -> dict[str, str]:
        """{name: first name} for entries that are the same tensor (torch.save keeps tied
        weights as one storage), so a rewrite stores them once."""
        first: dict = {}
        out = {}
        for name, t in self.tensors.items():
            if t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in first:
                out[name] = first[key]
            else:
                first[key] = name
        return out

    def read_into(self, name: str, out: torch.Tensor, box: tuple | None = None, staging=None) -> int:
        """Copy the box (offset, shape) of tensor `name` (default all) into out; returns bytes."""
        _, offset, bshape = self._box(name, out, box)
        src = self.tensors[name][tuple(slice(o, o + s) for o, s in zip(offset, bshape))]
        with torch.no_grad():
            out.copy_(src)
        self.bytes_read += out.nbytes
        return out.nbytes


class _NotMappable(Exception):
    pass


def _load(path: str, mmap: bool):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):
            raise _NotMappable() from None
        raise CheckpointError(f"{path}: not a readable PyTorch weights file: {_first_line(e)}") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors, and dist_saver never unpickles arbitrary "
            f"objects (torch.load weights_only=True said: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines if "Unsupported global" in line), lines[0])[:300]
