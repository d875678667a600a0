"""The load plan: pure functions of the index, the files' headers and the targets, as plan.py is
for saves. No torch.distributed, no I/O, no tensor data here: testable at 1024 ranks.

- resolve: which stored tensor fills each target (tied names included), which targets and stored
  names have no counterpart (strict), grouped by file.
- check: every target's shape and dtype against the file's header entry, before a byte is read.
- box_items: the file byte spans of one target box, and where each lands: straight into a
  contiguous CPU target, or through a staging buffer (CUDA, non-contiguous, column boxes of narrow
  rows read as whole rows) in pieces of at most `chunk` bytes.
- column_targets: which targets are read once per group through the load exchange (boxes split by
  columns whose mesh is inside the loading group); their schedule is load_exchange.make_schedule.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from .errors import CheckpointError

# Below this many contiguous bytes per run, reading whole rows sequentially beats exact reads
# (thousands of tiny random reads were ~10x slower here).
SMALL_RUN = 64 << 10


class Item(NamedTuple):
    """Bytes [offset, offset + nbytes) of a file and where they go."""

    offset: int  # absolute file offset
    nbytes: int
    target: int  # the request (target) it fills; -1: read only to be checked
    at: int  # direct items: the byte offset in the contiguous target
    dst_box: tuple | None  # staged items: (offset, shape) of the part of the target it fills; None: direct
    src_shape: tuple | None  # staged items: the shape its bytes form
    src_box: tuple | None  # staged items: (offset, shape) of those to copy; None: all


def _run_dim(shape, offset, bshape, item) -> tuple[int, int]:
    """(k, step): each contiguous run of the box is bshape[k] steps of `step` bytes along dim k,
    the last dim (0 at least) that the box does not cover fully; the dims after it merge in."""
    k = len(shape) - 1
    while k > 0 and offset[k] == 0 and bshape[k] == shape[k]:
        k -= 1
    return k, item * math.prod(shape[k + 1 :])


def is_one_run(shape, offset, bshape) -> bool:
    """Whether the box is one contiguous run of the tensor's row-major bytes (whole rows, or part
    of one row): every dim before the last partial one has extent 1."""
    k, _ = _run_dim(shape, offset, bshape, 1)
    return all(s == 1 for s in bshape[:k])


def run_length(shape, offset, bshape, item) -> int:
    k, step = _run_dim(shape, offset, bshape, item)
    return bshape[k] * step if k > 0 else 1 << 62  # a range of whole rows is one run however short


def runs(shape: Sequence[int], offset: Sequence[int], bshape: Sequence[int], item: int):
    """(byte offset in the tensor, length) of each contiguous run of the box, in row-major order."""
    if not shape:
        yield 0, item
        return
    k, inner = _run_dim(shape, offset, bshape, item)
    strides = _strides(shape, item)
    length = bshape[k] * inner
    base = offset[k] * inner
    for idx in itertools.product(*(range(o, o + s) for o, s in zip(offset[:k], bshape[:k]))):
        yield base + sum(i * st for i, st in zip(idx, strides)), length


def _strides(shape, item) -> list[int]:
    out = [0] * len(shape)
    acc = item
    for d in range(len(shape) - 1, -1, -1):
        out[d] = acc
        acc *= shape[d]
    return out


def box_items(start: int, shape: tuple, item: int, offset: tuple, bshape: tuple, direct: bool, target: int,
              chunk: int) -> list[Item]:
    """The items that read box (offset, bshape) of the tensor of `shape` whose data starts at file
    offset `start` into a target of shape bshape (direct: contiguous CPU memory, filled in place).

    A box that is one run of the file is one span; others are one span per run, or whole rows
    when their runs are short (SMALL_RUN). Staged items hold at most `chunk` bytes (split along
    the first dim that can be split), down to one element."""
    n = item * math.prod(bshape)
    if n == 0:
        return []
    if direct and shape and tuple(bshape[1:]) == tuple(shape[1:]):  # whole rows (whole tensors, Shard(0))
        return [Item(start + offset[0] * (n // bshape[0]), n, target, 0, None, None, None)]
    out: list[Item] = []
    _box_items(start, tuple(shape), item, tuple(offset), tuple(bshape), (0,) * len(bshape), tuple(bshape), direct,
               target, chunk, out)
    return out


def _box_items(start, shape, item, off, bshape, doff, tshape, direct, target, chunk, out) -> None:
    n = item * math.prod(bshape)
    if not shape:
        out.append(Item(start, item, target, 0, None, None, None) if direct
                   else Item(start, item, target, 0, ((), ()), (), None))
        return
    strides = _strides(shape, item)
    if is_one_run(shape, off, bshape):
        first = start + sum(o * st for o, st in zip(off, strides))
        if direct:
            at = sum(o * st for o, st in zip(doff, _strides(tshape, item)))
            out.append(Item(first, n, target, at, None, None, None))
        elif n <= chunk or all(s == 1 for s in bshape):
            out.append(Item(first, n, target, 0, (doff, bshape), bshape, None))
        else:
            _split(start, shape, item, off, bshape, doff, tshape, direct, target, chunk, out, n)
        return
    row = item * math.prod(shape[1:])
    if run_length(shape, off, bshape, item) < SMALL_RUN and row <= chunk:
        per = max(1, chunk // row)
        inner_off, inner = (0,) + tuple(off[1:]), tuple(bshape[1:])
        for lo in range(0, bshape[0], per):
            k = min(per, bshape[0] - lo)
            out.append(Item(start + (off[0] + lo) * row, k * row, target, 0,
                            ((doff[0] + lo,) + tuple(doff[1:]), (k,) + inner), (k,) + tuple(shape[1:]),
                            (inner_off, (k,) + inner)))
        return
    # long runs: one slice at a time along the first dim that has more than one
    d = next(i for i, s in enumerate(bshape) if s > 1)
    for i in range(bshape[d]):
        _box_items(start, shape, item, off[:d] + (off[d] + i,) + off[d + 1:], bshape[:d] + (1,) + bshape[d + 1:],
                   doff[:d] + (doff[d] + i,) + doff[d + 1:], tshape, direct, target, chunk, out)


def _split(start, shape, item, off, bshape, doff, tshape, direct, target, chunk, out, n) -> None:
    """A staged run too large for one item: pieces along the first dim that has more than one."""
    d = next(i for i, s in enumerate(bshape) if s > 1)
    per = max(1, chunk // (n // bshape[d]))
    for lo in range(0, bshape[d], per):
        k = min(per, bshape[d] - lo)
        _box_items(start, shape, item, off[:d] + (off[d] + lo,) + off[d + 1:], bshape[:d] + (k,) + bshape[d + 1:],
                   doff[:d] + (doff[d] + lo,) + doff[d + 1:], tshape, direct, target, chunk, out)


# ---------------------------------------------------------------------------------------------------
# which stored tensor fills which target


class Target(NamedTuple):
    """A target as the plan sees it (no tensor data)."""

    name: str
    shape: tuple[int, ...]  # the global shape
    dtype: object  # torch dtype
    box: tuple | None  # (offset, shape) of the global tensor this rank holds; None: all of it


@dataclass
class Reads:
    """One rank's reads from one index, planned."""

    # stored name -> the targets it fills: [(target, box)] (several for untied targets of one name)
    fills: dict[str, list[Target]] = field(default_factory=dict)
    # stored name -> targets tied to a target filled from another stored name: checked, not read
    checks: dict[str, list[Target]] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)  # target names filled, tied names included
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    by_file: dict[str, list[str]] = field(default_factory=dict)  # file -> stored names read or checked

    def nbytes(self) -> int:
        return sum(t.dtype.itemsize * math.prod(t.shape if t.box is None else t.box[1])
                   for ts in self.fills.values() for t in ts)


def resolve(weight_map: Mapping[str, str], aliases: Mapping[str, str], tie_groups: Iterable[Sequence[Target]],
            stored_names: Iterable[str], strict: bool, directory: str) -> Reads:
    """Which stored tensor fills each target. tie_groups: the targets, grouped by shared memory
    (tied weights: one read fills all); each group is filled from the first of its names that the
    checkpoint holds, the others checked against their own stored tensor. stored_names: every name
    the checkpoint has (stored and aliases), for `unexpected`."""
    reads = Reads()
    fills, checks, loaded = reads.fills, reads.checks, reads.loaded
    missing: list[str] = []
    alias_of = aliases.get
    for group in tie_groups:
        if len(group) == 1:  # the common case, untied: a few dict lookups
            t = group[0]
            name = t[0]
            if name in weight_map:
                stored = name
            else:
                stored = alias_of(name)
                if stored is None or stored not in weight_map:
                    missing.append(name)
                    continue
            loaded.append(name)
            box = t[3]
            if box is None or all(s > 0 for s in box[1]):  # an empty shard needs no file
                ts = fills.get(stored)
                if ts is None:
                    fills[stored] = [t]
                else:
                    ts.append(t)
            continue
        found = []
        for t in group:
            stored = t.name if t.name in weight_map else alias_of(t.name)
            if stored is not None and stored in weight_map:
                found.append((t, stored))
        if not found:
            missing.extend(t.name for t in group)
            continue
        loaded.extend(t.name for t in group)
        first, stored = found[0]
        if first.box is None or all(s > 0 for s in first.box[1]):
            fills.setdefault(stored, []).append(first)
        for other, where in found[1:]:
            if where != stored:
                checks.setdefault(where, []).append(other)
    targets = set(loaded)  # every target is loaded or missing
    targets.update(missing)
    reads.missing = sorted(missing)
    reads.unexpected = sorted([n for n in stored_names if n not in targets])
    if strict and (reads.missing or reads.unexpected):
        m, u = reads.missing, reads.unexpected
        raise CheckpointError(
            f"checkpoint {directory} does not match the model: missing {m[:10]}{'...' if len(m) > 10 else ''}, "
            f"unexpected {u[:10]}{'...' if len(u) > 10 else ''} (pass strict=False to load the overlap)")
    names = list(fills)
    if checks:
        names += [n for n in checks if n not in fills]
    by_file = reads.by_file
    for stored in sorted(names):
        file = weight_map[stored]
        ts = by_file.get(file)
        if ts is None:
            by_file[file] = [stored]
        else:
            ts.append(stored)
    return reads


def mismatch(t: Target, file: str, dtype, shape, stored: str) -> CheckpointError:
    """The error for a target whose shape or dtype is not its stored tensor's."""
    return CheckpointError(f"tensor {t.name!r}: the model has {t.dtype}{list(t.shape)} but file {file} has "
                           f"{dtype}{list(shape)} (stored as {stored!r})")


def check(reads: Reads, file: str, info: Callable[[str], tuple]) -> None:
    """Every target of the file against its header entry (info(stored) -> (dtype, shape, ...))."""
    for stored in reads.by_file.get(file, ()):
        dtype, shape = info(stored)[:2]
        for t in reads.fills.get(stored, []) + reads.checks.get(stored, []):
            if t.shape != shape or t.dtype != dtype:
                raise mismatch(t, file, dtype, shape, stored)


def column_targets(reads: Reads, layouts: Mapping[str, object], in_group: Callable[[Sequence[int]], bool]) -> set[str]:
    """Stored names whose (first) target box is not one run of the file and whose layout's mesh is
    inside the loading group: read once per group through the load exchange."""
    out = set()
    for stored, ts in reads.fills.items():
        t = ts[0]
        box = t[3]
        if box is None or tuple(box[1][1:]) == t[1][1:]:  # all of it, or whole rows: one run
            continue
        layout = layouts.get(t.name)
        if layout is None or is_one_run(t.shape, *box):
            continue
        if in_group(layout.mesh_ranks):
            out.add(stored)
    return out
