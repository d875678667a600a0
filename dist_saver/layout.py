"""How a tensor is split over ranks, and which box of the global tensor each rank holds.

A plain tensor is held whole by the rank that has it. A DTensor's layout (its mesh and placements)
is the same on every rank, so it travels once in the metadata and every rank derives every other
rank's box from it with DTensor's own shard arithmetic.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from itertools import product
from typing import Mapping, Sequence

import torch

from .torch_compat import local_shape_and_offset, strided_shard_type

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) in the global tensor
Tiling = Sequence[Mapping[int, Box]]  # per layout (replica group) of a tensor: group rank -> its box


@dataclass(frozen=True)
class Layout:
    """A DTensor's placement: the mesh (global ranks, row-major) and its placements."""

    mesh_shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]  # global ranks, flattened row-major
    placements: tuple  # torch Placement objects (hashable, picklable)

    def describe(self) -> str:
        return f"placements {list(self.placements)} on a mesh of shape {list(self.mesh_shape)}"


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "device_mesh") and hasattr(t, "to_local")


def is_nonempty(box: Box | None) -> bool:
    """Whether a box holds any element (an uneven shard can be empty; None is no box)."""
    return box is not None and all(s > 0 for s in box[1])


# layout_of's memo: one Layout object per (device mesh, placements), sharing one tuple of ranks per
# mesh, so the metadata of 10^5 DTensors pickles each mesh's ranks once (pickle memoizes a shared
# object), not once per tensor: O(tensors), not O(tensors x ranks). An entry holds a weak reference
# to its mesh (an id may be reused once the mesh is gone); cleared when past _LAYOUT_MEMO_SIZE.
_LAYOUTS: dict = {}  # (id(mesh), placements) -> (mesh ref, Layout, {(shape, rank): the rank's box})
_INTERNED: dict = {}  # Layout or tuple of ranks -> the one object of that value
_LAYOUT_MEMO_SIZE = 256
_UNSEEN = object()


def layout_of(name: str, t: torch.Tensor) -> Layout | None:
    """The layout of a DTensor (None for a plain tensor); raises for placements we cannot save.
    Equal layouts are one object (see _LAYOUTS); each (shape, layout)'s tiling is checked once."""
    if not is_dtensor(t):
        return None
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (id(mesh), placements)
    hit = _LAYOUTS.get(key)
    if hit is None or hit[0]() is not mesh:
        for p in placements:
            if not isinstance(p, _whole_value_placements()):
                raise ValueError(
                    f"tensor {name!r} has placements {list(placements)}: {p} is not supported "
                    "(only Shard and Replicate hold whole values; reduce Partial first, e.g. with "
                    ".redistribute() or .full_tensor())"
                )
        if len(_LAYOUTS) >= _LAYOUT_MEMO_SIZE:
            _LAYOUTS.clear()
            _INTERNED.clear()
        grid = mesh.mesh
        ranks = tuple(int(r) for r in grid.flatten().tolist())
        ranks = _INTERNED.setdefault(ranks, ranks)
        layout = Layout(tuple(grid.shape), ranks, placements)
        layout = _INTERNED.setdefault(layout, layout)
        try:
            ref = weakref.ref(mesh)
        except TypeError:  # not weakly referenceable: held
            ref = lambda mesh=mesh: mesh  # noqa: E731
        hit = _LAYOUTS[key] = (ref, layout, {})
    _, layout, own_boxes = hit
    shape = tuple(t.shape)
    rank = torch.distributed.get_rank()
    own = own_boxes.get((shape, rank), _UNSEEN)
    if own is _UNSEEN:
        boxes = rank_boxes(shape, layout)
        check_tiling(name, shape, layout, boxes)
        own = own_boxes[(shape, rank)] = boxes.get(rank)
    local = t.to_local()
    if own is None or tuple(local.shape) != own[1]:
        raise ValueError(
            f"tensor {name!r}: the local piece has shape {list(local.shape)} but its "
            f"{layout.describe()} gives {own and list(own[1])}; this layout is not supported"
        )
    return layout


def _whole_value_placements() -> tuple[type, ...]:
    """Placements whose pieces hold plain values (Partial ones hold addends)."""
    from torch.distributed.tensor import Replicate, Shard

    strided = strided_shard_type()  # FSDP2 on top of tensor parallel shards the same dim "right to left"
    return (Shard, Replicate) + ((strided,) if strided is not None else ())


def rank_boxes(shape: tuple[int, ...], *layouts: Layout) -> dict[int, Box]:
    """Global rank -> the box it holds (empty boxes included), over one or more layouts."""
    return dict(_rank_boxes(tuple(shape), layouts))


@functools.lru_cache(maxsize=4096)  # a model repeats a few shapes and layouts in every layer
def _rank_boxes(shape: tuple[int, ...], layouts: tuple[Layout, ...]) -> tuple[tuple[int, Box], ...]:
    out: dict[int, Box] = {}
    for layout in layouts:
        coords = product(*(range(n) for n in layout.mesh_shape))
        for rank, coord in zip(layout.mesh_ranks, coords):
            local_shape, offset = local_shape_and_offset(shape, layout.mesh_shape, coord, layout.placements)
            out[rank] = (offset, local_shape)
    return tuple(out.items())


def check_tiling(name: str, shape: tuple[int, ...], layout: Layout, boxes: dict[int, Box]) -> None:
    """The distinct non-empty boxes must form a grid that covers the tensor exactly once.

    DTensor's Shard/Replicate layouts always do; a layout whose local pieces are not boxes
    (e.g. a strided shard that interleaves rows) does not, and would be saved wrong.
    """
    distinct = {b for b in boxes.values() if is_nonempty(b)}
    if not distinct:
        return
    cells = 1
    ok = True
    for d, n in enumerate(shape):
        intervals = sorted({(b[0][d], b[0][d] + b[1][d]) for b in distinct})
        pos = 0
        for lo, hi in intervals:
            ok &= lo == pos
            pos = hi
        ok &= pos == n
        cells *= len(intervals)
    if not ok or cells != len(distinct):
        raise ValueError(
            f"tensor {name!r} with {layout.describe()}: the local pieces are not boxes that tile "
            "the tensor, so it cannot be assembled; this layout is not supported"
        )


def group_boxes(name: str, shape: tuple[int, ...], layouts: tuple[Layout, ...], group_rank) -> Tiling:
    """One {group rank: box} per layout of a tensor (one layout per replica group; each tiles the
    tensor on its own, so pieces are taken from one of them, never mixed).

    group_rank maps a global rank to the saving group's rank (-1 if not a member): every rank of a
    DTensor's mesh must be in the group that saves it.
    """
    out = tuple({group_rank(r): b for r, b in rank_boxes(shape, layout).items()} for layout in layouts)
    if any(-1 in t for t in out):
        raise ValueError(
            f"tensor {name!r} is sharded over global ranks {sorted({r for l in layouts for r in l.mesh_ranks})}, "
            "not all of which are in the process group saving it"
        )
    return out


def merged(tiling: Tiling) -> dict[int, Box]:
    """Rank -> the box it holds, over all of a tensor's layouts (their ranks are disjoint)."""
    return {r: b for t in tiling for r, b in t.items()}
