"""The save plan: a pure function of the gathered metadata.

Every rank computes the same Plan from the same inputs, so file names, headers and offsets need no
further communication. No torch.distributed, no I/O, no tensor data here.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

from . import format as fmt
from .errors import PlanError
from .state import TensorMeta


class TensorInfo(NamedTuple):
    """A tensor of the merged, global state dict."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # Ranks that hold the whole tensor, when only some do (e.g. pipeline stages); None: any rank
    # may own it (every rank holds it, or it is sharded and gets assembled on its owner).
    holders: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FilePlan:
    number: int  # 1-based, global
    name: str
    rank: int  # the only rank that writes this file
    tensors: tuple[fmt.HeaderEntry, ...]  # in data order; offsets relative to the data buffer
    data_size: int


@dataclass(frozen=True)
class Plan:
    world_size: int
    files: tuple[FilePlan, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> stored name

    @property
    def total_size(self) -> int:
        return sum(f.data_size for f in self.files)

    def files_of(self, rank: int) -> list[FilePlan]:
        return [f for f in self.files if f.rank == rank]

    def weight_map(self) -> dict[str, str]:
        return {t.name: f.name for f in self.files for t in f.tensors}

    def owners(self) -> dict[str, int]:
        return {t.name: f.rank for f in self.files for t in f.tensors}

    def bytes_per_rank(self) -> list[int]:
        out = [0] * self.world_size
        for f in self.files:
            out[f.rank] += f.data_size
        return out


def _without_gc(fn):
    """Planning allocates ~10^5 small tuples with no cycles; the cyclic GC would rescan them
    over and over (two thirds of the time at 50,000 tensors)."""

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


@_without_gc
def merge_metadata(
    groups: Sequence[tuple[Sequence[int], Sequence[TensorMeta]]],
    world_size: int,
    aliases_by_group: Sequence[dict[str, str]] | None = None,
) -> tuple[list[TensorInfo], dict[str, str]]:
    """Merge the ranks' tensor lists (grouped: ranks with identical lists send one) into one.

    Order: first appearance, groups taken in rank order. A name seen with different dtype or
    global shape raises PlanError naming the ranks on each side.
    """
    order: dict[str, TensorMeta] = {}
    seen_by: dict[str, list] = {}  # name -> [rank tuples of the groups holding it]
    for ranks, metas in groups:
        ranks = tuple(ranks)
        for m in metas:
            first = order.get(m.name)
            if first is None:
                order[m.name] = m
                seen_by[m.name] = [ranks]
                continue
            if first.dtype != m.dtype or first.shape != m.shape:
                a = seen_by[m.name][0]
                raise PlanError(
                    f"tensor {m.name!r} differs across ranks: {first.dtype}{list(first.shape)} on "
                    f"rank(s) {_ranks(a)} but {m.dtype}{list(m.shape)} on rank(s) {_ranks(ranks)}"
                )
            seen_by[m.name].append(ranks)
            # A layout differing across groups is fine (the group differs for another reason).

    aliases: dict[str, str] = {}
    alias_src: dict[str, tuple] = {}
    for (ranks, _), group_aliases in zip(groups, aliases_by_group or [{}] * len(groups)):
        for alias, target in group_aliases.items():
            if alias in aliases and aliases[alias] != target:
                raise PlanError(
                    f"tensor {alias!r} is tied to {aliases[alias]!r} on rank(s) {_ranks(alias_src[alias])} "
                    f"but to {target!r} on rank(s) {_ranks(ranks)}"
                )
            aliases[alias] = target
            alias_src[alias] = tuple(ranks)
    for alias, target in aliases.items():
        if alias in order:
            raise PlanError(
                f"tensor {alias!r} is tied to {target!r} on rank(s) {_ranks(alias_src[alias])} "
                f"but is a separate tensor on rank(s) {_ranks(seen_by[alias][0])}"
            )

    infos = []
    for name, m in order.items():
        # A sharded tensor is assembled on its owner, so any rank may own it.
        holders = None if m.layout is not None else _holders(seen_by[name], world_size)
        infos.append(TensorInfo(name, m.dtype, m.shape, m.nbytes, holders))
    return infos, aliases


def _holders(rank_groups: list[tuple[int, ...]], world_size: int) -> tuple[int, ...] | None:
    if len(rank_groups) == 1 and len(rank_groups[0]) == world_size:
        return None  # the common case (every rank identical): no constraint, no set building
    holders = sorted({r for g in rank_groups for r in g})
    return None if len(holders) == world_size else tuple(holders)


def _ranks(ranks: Iterable[int]) -> str:
    ranks = list(ranks)
    return ",".join(map(str, ranks[:8])) + (",..." if len(ranks) > 8 else "")


def assign_owners(tensors: Sequence[TensorInfo], world_size: int) -> list[int]:
    """Owner rank per tensor: contiguous runs of the state dict, balanced by bytes.

    Tensors that any rank may own are split by the midpoint rule: tensor i goes to the rank whose
    equal share of the total bytes contains the middle of tensor i. Each rank then gets a
    contiguous run of at most ideal + the largest tensor (half the first plus half the last
    tensor can stick out of its share). Tensors held by a subset of ranks get the same rule
    within that subset.
    """
    owners = [0] * len(tensors)
    by_holders: dict[tuple[int, ...] | None, list[int]] = {}
    for i, t in enumerate(tensors):
        by_holders.setdefault(t.holders, []).append(i)
    for holders, idx in by_holders.items():
        ranks = range(world_size) if holders is None else holders
        n = len(ranks)
        total = sum(tensors[i].nbytes for i in idx)
        before = 0
        for i in idx:
            size = tensors[i].nbytes
            # integer arithmetic: the same answer on every rank and platform
            slot = (2 * before + size) * n // (2 * total) if total else 0
            owners[i] = ranks[min(slot, n - 1)]
            before += size
    return owners


@_without_gc
def make_plan(
    tensors: Sequence[TensorInfo],
    world_size: int,
    max_shard_size: int | None = None,
    aliases: dict[str, str] | None = None,
) -> Plan:
    """Owner and file of every tensor, the files' global numbering and each tensor's offsets."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    aliases = dict(aliases or {})
    names = {t.name for t in tensors}
    for alias, target in aliases.items():
        if target not in names:
            raise PlanError(f"tensor {alias!r} is tied to {target!r}, which is not saved")
    owners = assign_owners(tensors, world_size)

    per_rank: list[list[list[TensorInfo]]] = [[] for _ in range(world_size)]
    sizes: list[int] = [0] * world_size  # bytes in each rank's current (last) file
    for t, r in zip(tensors, owners):
        files = per_rank[r]
        if not files or (max_shard_size is not None and files[-1] and sizes[r] + t.nbytes > max_shard_size):
            files.append([])
            sizes[r] = 0
        files[-1].append(t)
        sizes[r] += t.nbytes

    total_files = sum(len(fs) for fs in per_rank)
    out: list[FilePlan] = []
    for rank, files in enumerate(per_rank):
        for members in files:
            number = len(out) + 1
            entries, offset = _layout_file(members)
            out.append(FilePlan(number, fmt.shard_file_name(number, total_files), rank, entries, offset))
    return Plan(world_size, tuple(out), aliases)


def _layout_file(members: list[TensorInfo]) -> tuple[tuple[fmt.HeaderEntry, ...], int]:
    # Largest item size first: every offset is then a multiple of its tensor's item size.
    ordered = sorted(members, key=lambda t: -fmt.itemsize(t.dtype))
    entries = []
    offset = 0
    for t in ordered:
        entries.append(fmt.HeaderEntry(t.name, t.dtype, t.shape, offset, offset + t.nbytes))
        offset += t.nbytes
    return tuple(entries), offset
