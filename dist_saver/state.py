"""From a model or state dict to what the planner needs: names, dtypes, global shapes, aliases.

Runs on one rank, touches no process group and no tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from . import format as fmt
from .layout import Layout, is_dtensor, layout_of
from .format import nbytes


@dataclass(frozen=True)
class TensorMeta:
    """One stored tensor as one rank sees it. Equal on every rank that holds the same tensor."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]  # the global shape
    layout: Layout | None = None  # None: this rank holds the whole tensor

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass
class LocalState:
    metas: list[TensorMeta]  # state-dict order, aliases excluded
    aliases: dict[str, str]  # alias name -> the name it is stored under
    tensors: dict[str, torch.Tensor]  # stored name -> local data (a DTensor's local shard)
    # Pairs of stored names whose memory overlaps without being the same view: each is saved in
    # full (the shared bytes twice) and loads back as a separate tensor. dist_save warns.
    overlaps: list[tuple[str, str]] = field(default_factory=list)


def as_state_dict(model_or_state_dict) -> Mapping[str, object]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(
        f"expected an nn.Module or a mapping of name -> tensor, got {type(model_or_state_dict).__name__}"
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


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


def collect(model_or_state_dict, cast: torch.dtype | None = None) -> LocalState:
    """Describe this rank's tensors; raise TypeError/ValueError naming the bad entry. cast: the
    dtype floating-point tensors are saved in (described so; the bytes are cast while written)."""
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
            code = fmt.dtype_code(cast if cast is not None and value.is_floating_point() else value.dtype)
        except TypeError as e:
            raise TypeError(f"tensor {name!r}: {e}") from None
        layout = layout_of(name, value)
        metas.append(TensorMeta(name, code, tuple(value.shape), layout))
        tensors[name] = local
    return LocalState(metas, aliases, tensors, find_overlaps(tensors))


# Above this many elements in the union of two interleaved views' spans, or once the exact checks
# of one save have marked this many in all, overlap is decided from the spans alone (the exact check
# marks every element of the union; a pathological state dict must not make collect() slow).
EXACT_OVERLAP_LIMIT = 1 << 24
EXACT_OVERLAP_BUDGET = 1 << 27


def find_overlaps(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pairs of tensors that share bytes of one storage but are different views (identical views
    are aliases, found before). As safetensors' _find_shared_tensors: group by storage, sort by
    start, compare byte spans; views with gaps (strided) whose spans interleave are checked
    element by element when small, so column slices of one matrix are not reported."""
    order = {name: i for i, name in enumerate(tensors)}
    by_storage: dict = {}
    for name, t in tensors.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        begin = t.storage_offset() * t.element_size()
        end = begin + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
        by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((begin, end, name))
    out, budget = [], [EXACT_OVERLAP_BUDGET]
    for spans in by_storage.values():
        if len(spans) < 2:
            continue
        spans.sort()
        for i, (begin, end, name) in enumerate(spans):
            for other_begin, _, other in spans[i + 1:]:
                if other_begin >= end:
                    break  # sorted by start: no later span reaches back into this one
                if _share_bytes(tensors[name], tensors[other], budget):
                    out.append(tuple(sorted((name, other), key=order.get)))  # in state-dict order
    return sorted(out, key=lambda p: (order[p[0]], order[p[1]]))


def _share_bytes(a: torch.Tensor, b: torch.Tensor, budget: list[int]) -> bool:
    """a and b (same storage, overlapping spans) have at least one byte in common."""
    if (a.is_contiguous() and b.is_contiguous()) or a.element_size() != b.element_size():
        return True  # contiguous spans that intersect do share bytes
    lo = min(a.storage_offset(), b.storage_offset())
    hi = max(t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) for t in (a, b))
    if hi - lo > min(EXACT_OVERLAP_LIMIT, budget[0]):
        return True
    budget[0] -= hi - lo
    mark = torch.zeros(hi - lo, dtype=torch.bool)
    mark.as_strided(a.shape, a.stride(), a.storage_offset() - lo).fill_(True)
    return bool(mark.as_strided(b.shape, b.stride(), b.storage_offset() - lo).any())
