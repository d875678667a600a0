"""From a model or state dict to what the planner needs: names, dtypes, global shapes, aliases.

Runs on one rank, touches no process group and no tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from . import format as fmt
from .layout import Layout, layout_of


@dataclass(frozen=True)
class TensorMeta:
    """One stored tensor as one rank sees it. Equal on every rank that holds the same tensor."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]  # the global shape
    layout: Layout | None = None  # None: this rank holds the whole tensor

    @property
    def nbytes(self) -> int:
        n = fmt.itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class LocalState:
    metas: list[TensorMeta]  # state-dict order, aliases excluded
    aliases: dict[str, str]  # alias name -> the name it is stored under
    tensors: dict[str, torch.Tensor]  # stored name -> local data (a DTensor's local shard)


def as_state_dict(model_or_state_dict) -> Mapping[str, object]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(
        f"expected an nn.Module or a mapping of name -> tensor, got {type(model_or_state_dict).__name__}"
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def alias_key(t: torch.Tensor):
    """Two names with the same key are one tensor (tied weights): same memory, same view."""
    local = _local(t)
    if local.numel() == 0 or local.device.type == "meta":
        return None  # empty tensors share no bytes; meta tensors have no memory
    return (
        local.device,
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(local.shape),
        local.stride(),
        local.dtype,
        tuple(getattr(t, "placements", ())),
    )


def collect(model_or_state_dict) -> LocalState:
    """Describe this rank's tensors; raise TypeError/ValueError naming the bad entry."""
    sd = as_state_dict(model_or_state_dict)
    metas: list[TensorMeta] = []
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    first_by_key: dict = {}
    for name, value in sd.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "only tensors can be saved in safetensors"
            )
        local = _local(value)
        if local.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        if local.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {local.layout}; only dense tensors can be saved")
        key = alias_key(value)
        if key is not None and key in first_by_key:
            aliases[name] = first_by_key[key]
            continue
        if key is not None:
            first_by_key[key] = name
        try:
            code = fmt.dtype_code(value.dtype)
        except TypeError as e:
            raise TypeError(f"tensor {name!r}: {e}") from None
        layout = layout_of(name, value)
        metas.append(TensorMeta(name, code, tuple(value.shape), layout))
        tensors[name] = local
    return LocalState(metas, aliases, tensors)
