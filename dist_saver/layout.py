"""How a tensor is split over ranks. Plain tensors are held whole by the rank that has them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Placeholder for sharded (DTensor) layouts."""


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def layout_of(name: str, t: torch.Tensor) -> Layout | None:
    if is_dtensor(t):
        raise NotImplementedError(f"tensor {name!r} is a DTensor; sharded tensors are not supported yet")
    return None
