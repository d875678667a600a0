"""From a model or state dict to what the planner needs: names, dtypes, global shapes, aliases.

Runs on one rank, touches no process group and no tensor data.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import torch

from . import format as fmt
from .layout import Layout, is_dtensor, layout_of
from .format import nbytes


class TensorMeta(NamedTuple):  # a NamedTuple: a save describes (and pickles) 10^5 of these
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types that are never DTensors: the fast path
_CODES: dict = {}  # torch dtype -> safetensors code, filled as met
_SHAPES: dict = {}  # one tuple per distinct shape (the gathered metadata pickles each once)


def _without_gc(fn):
    """Describing allocates ~10^5 small tuples with no cycles; the cyclic GC would rescan them
    (and the state dict's tensors) over and over: half the time at 50,000 tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def _code(dtype: torch.dtype) -> str:
    code = _CODES.get(dtype)
    if code is None:
        code = _CODES[dtype] = fmt.dtype_code(dtype)  # raises for dtypes safetensors cannot hold
    return code


@_without_gc
def collect(model_or_state_dict, cast: torch.dtype | None = None) -> LocalState:
    """Describe this rank's tensors; raise TypeError/ValueError naming the bad entry. cast: the
    dtype floating-point tensors are saved in (described so; the bytes are cast while written).

    One pass over the tensors, a few attribute reads each (10^5 tensors: mixture-of-experts):
    identical views (same address, dtype, shape, strides, device and placements) are aliases; the
    byte spans of the others are kept for the overlap check (_overlaps)."""
    sd = as_state_dict(model_or_state_dict)
    metas: list[TensorMeta] = []
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    by_address: dict = {}  # first byte -> the name (or list of names) stored with data there
    cpu_spans: list = []  # (first byte, end, index in metas) of the CPU tensors
    spans: dict = {None: cpu_spans}  # device (None: CPU) -> such spans
    shapes, codes, strided, new = _SHAPES, _CODES, torch.strided, tuple.__new__
    if len(shapes) > 4096:
        shapes.clear()
    for name, value in sd.items():
        if value.__class__ in _PLAIN:
            local, dtensor = value, False
        elif isinstance(value, torch.Tensor):
            dtensor = is_dtensor(value)
            local = value.to_local() if dtensor else value
        else:
            local = None
        if name.__class__ is not str and not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a string")
        if local is None:
            raise TypeError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "only tensors can be saved in safetensors"
            )
        if local.is_cpu:
            device = None  # the common case, without making a device object
        elif local.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        else:
            device = local.device
        if local.layout != strided:
            raise TypeError(f"tensor {name!r} has layout {local.layout}; only dense tensors can be saved")
        size = local.nbytes
        if size:  # empty tensors share no bytes
            begin = local.data_ptr()
            before = by_address.get(begin)
            if before is None:
                by_address[begin] = name
            else:  # another tensor starts at this address: the same view (tied weights)?
                before = [before] if before.__class__ is str else before
                target = _same_view(local, value, device, before, tensors, sd)
                if target is not None:
                    aliases[name] = target
                    continue
                by_address[begin] = before + [name]
            if not local.is_contiguous():  # the span from the first element to the last
                size = (1 + sum((n - 1) * s for n, s in zip(local.shape, local.stride()))) * local.element_size()
            at = cpu_spans if device is None else spans.get(device)
            if at is None:
                at = spans[device] = []
            at.append((begin, begin + size, len(metas)))
        dtype = local.dtype
        code = codes.get(dtype) if cast is None or not dtype.is_floating_point else None
        if code is None:
            try:
                code = _code(cast if cast is not None and dtype.is_floating_point else dtype)
            except TypeError as e:
                raise TypeError(f"tensor {name!r}: {e}") from None
        full = value.shape  # the global shape
        shape = shapes.get(full)
        if shape is None:
            shape = shapes[full] = tuple(full)
        metas.append(new(TensorMeta, (name, code, shape, layout_of(name, value) if dtensor else None)))
        tensors[name] = local
    return LocalState(metas, aliases, tensors, _overlaps(spans, [m.name for m in metas], tensors))


def _same_view(local: torch.Tensor, value: torch.Tensor, device, names: list[str],
               tensors: Mapping[str, torch.Tensor], sd: Mapping) -> str | None:
    """The one of names (stored tensors starting at local's address) that is the same view as
    local (alias_key's test), or None."""
    for other in names:
        t = tensors[other]
        if (t.dtype == local.dtype and t.shape == local.shape and t.stride() == local.stride()
                and (None if t.is_cpu else t.device) == device
                and tuple(getattr(sd[other], "placements", ())) == tuple(getattr(value, "placements", ()))):
            return other
    return None


# Above this many elements in the union of two interleaved views' spans, or once the exact checks
# of one save have marked this many in all, overlap is decided from the spans alone (the exact check
# marks every element of the union; a pathological state dict must not make collect() slow).
EXACT_OVERLAP_LIMIT = 1 << 24
EXACT_OVERLAP_BUDGET = 1 << 27


def _span(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last."""
    if t.is_contiguous():
        return t.nbytes
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def find_overlaps(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pairs of tensors that share bytes but are different views (identical views are aliases,
    found before); in state-dict order."""
    spans: dict = {}
    names = list(tensors)
    for i, t in enumerate(tensors.values()):
        if t.numel() and not t.is_meta:
            begin = t.data_ptr()
            spans.setdefault(t.device, []).append((begin, begin + _span(t), i))
    return _overlaps(spans, names, tensors)


def _overlaps(spans: Mapping, names: list[str], tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """As safetensors' _find_shared_tensors, over memory addresses: the byte spans [address, end)
    of each device sorted by start, each compared with the next ones that start inside it (the
    memory of two storages is disjoint, so no grouping by storage is needed); views with gaps
    (strided) whose spans interleave are checked element by element when small, so column slices
    of one matrix are not reported. spans: device -> [(begin, end, index into names)]."""
    out, budget = [], [EXACT_OVERLAP_BUDGET]
    for items in spans.values():
        items.sort()
        n = len(items)
        for i in range(n - 1):
            _, end, a = items[i]
            j = i + 1
            while j < n and items[j][0] < end:  # sorted by start: no later span reaches back
                b = items[j][2]
                if _share_bytes(tensors[names[a]], tensors[names[b]], budget):
                    out.append((a, b) if a < b else (b, a))
                j += 1
    out.sort()
    return [(names[a], names[b]) for a, b in out]


def _share_bytes(a: torch.Tensor, b: torch.Tensor, budget: list[int]) -> bool:
    """a and b (overlapping spans) have at least one byte in common."""
    item = a.element_size()
    if (a.is_contiguous() and b.is_contiguous()) or item != b.element_size():
        return True  # contiguous spans that intersect do share bytes
    pa, pb = a.data_ptr(), b.data_ptr()
    if (pa - pb) % item:
        return True  # not on one grid of elements (cannot happen within one storage)
    lo = min(pa, pb)
    oa, ob = (pa - lo) // item, (pb - lo) // item
    hi = max(oa + _span(a) // item, ob + _span(b) // item)
    if hi > min(EXACT_OVERLAP_LIMIT, budget[0]):
        return True
    budget[0] -= hi
    mark = torch.zeros(hi, dtype=torch.bool)
    mark.as_strided(a.shape, a.stride(), oa).fill_(True)
    return bool(mark.as_strided(b.shape, b.stride(), ob).any())
