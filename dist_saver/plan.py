"""The save plan: a pure function of the gathered metadata.

Every rank computes the same Plan from the same inputs, so file names, headers, offsets and the
rank that writes every byte range need no further communication. No torch.distributed, no I/O, no
tensor data here.

Each tensor has one owner (balanced by bytes), whose file holds it; the owner creates the file and
writes its header. The tensor's bytes are written in place by the ranks that hold them: a row band
that one rank holds whole (a Shard(0) piece: FSDP2, colwise TP; or a replicated tensor) is written by
that rank from its own memory; a band split across ranks by columns (rowwise TP, 2-D) is assembled
on one of the ranks holding its pieces (the exchange), with the bands spread across those ranks.
A small sharded tensor (make_plan's small_sharded_bytes) is assembled whole on its owner instead:
written in place its bands would be one tiny range per rank each (tensors x ranks ranges, each with
its own write, checksum and index entry); assembled, a file's run of small tensors is one range.
"""

from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Sequence

from . import format as fmt
from .errors import PlanError
from .layout import Box, Tiling, is_nonempty, merged
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


class Segment(NamedTuple):
    """Rows [lo, hi) along dim 0 of a tensor (0-d: [0, 1)), at data offsets [begin, end) of its file."""

    name: str
    lo: int
    hi: int
    begin: int
    end: int
    rank: int  # the rank that writes it
    assembled: bool  # its pieces are on several ranks: assembled on `rank` through the exchange


class Extent(NamedTuple):
    """Consecutive bytes of a file's data written by one rank in one pass (adjacent segments of the
    same rank and kind): written, checksummed and reported as a unit."""

    begin: int  # data offsets (relative to the data buffer, like HeaderEntry)
    end: int
    rank: int
    assembled: bool
    segments: tuple[Segment, ...]


# What dist_save passes as make_plan's small_sharded_bytes (read at each save). Measured, 20k
# sharded tensors of 8 KB: in place 2.47 s (2 ranks) / 4.82 s (4 ranks) and 40k / 80k ranges;
# assembled on their owners 1.60 s / 2.53 s and one range per file. Real models' small tensors are
# norms, biases and quantisation scales, so little crosses the network.
SMALL_SHARDED_BYTES = 1 << 20

# The checkpoint id in FilePlan.header, replaced by each save's (FilePlan.header_for).
_ID_PLACEHOLDER = "0" * fmt.CHECKPOINT_ID_CHARS


@dataclass(frozen=True)
class FilePlan:
    number: int  # 1-based, global
    name: str
    rank: int  # the owner: creates the file and writes its header
    tensors: tuple[fmt.HeaderEntry, ...]  # in data order; offsets relative to the data buffer
    data_size: int
    extents: tuple[Extent, ...] = ()  # who writes which data bytes, in order, tiling [0, data_size)

    @functools.cached_property
    def header(self) -> bytes:
        """The file's header, its __metadata__ marking it ours (format version and checkpoint id),
        with a placeholder id: header_for(id) is what a save writes, of the same length."""
        return fmt.encode_header(self.tensors, {fmt.SHARD_VERSION_KEY: fmt.WRITTEN_VERSION,
                                                fmt.SHARD_CHECKPOINT_KEY: _ID_PLACEHOLDER})

    @functools.cached_property
    def _id_at(self) -> int:
        # __metadata__ is the header's first key, so the first match is its id, not a tensor name
        needle = f'"{fmt.SHARD_CHECKPOINT_KEY}":"{_ID_PLACEHOLDER}"'.encode()
        return self.header.index(needle) + len(needle) - 1 - fmt.CHECKPOINT_ID_CHARS

    def header_for(self, checkpoint_id: str) -> bytes:
        """The header of this file in the save checkpoint_id (fmt.CHECKPOINT_ID_CHARS letters and
        digits: a uuid4().hex): the encoded header with the id put in, no encoding per save."""
        n = fmt.CHECKPOINT_ID_CHARS
        if len(checkpoint_id) != n or not (checkpoint_id.isascii() and checkpoint_id.isalnum()):
            raise ValueError(f"checkpoint id {checkpoint_id!r} is not {n} ASCII letters and digits")
        at = self._id_at
        return self.header[:at] + checkpoint_id.encode() + self.header[at + n:]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def size(self) -> int:
        return self.data_start + self.data_size


@dataclass(frozen=True)
class Plan:
    world_size: int
    files: tuple[FilePlan, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> stored name

    @property
    def total_size(self) -> int:
        return sum(f.data_size for f in self.files)

    def files_of(self, rank: int) -> list[FilePlan]:
        """The files this rank owns (creates)."""
        return [f for f in self.files if f.rank == rank]

    def extents_of(self, rank: int) -> list[tuple[FilePlan, Extent]]:
        """What this rank writes, in the order it writes it (see write_order)."""
        return self.write_order.get(rank, [])

    @functools.cached_property
    def write_order(self) -> dict[int, list[tuple[FilePlan, Extent]]]:
        """Rank -> its extents in file order, rotated to start at the rank's own position among
        the files: when every rank writes part of every file (FSDP), the ranks then write
        different files at any moment. Writes into one file serialise on its inode lock (measured
        on tmpfs: two processes interleaving 4 MiB writes in one file got 0.6-0.7 GB/s each,
        against 1.5-1.7 into files of their own)."""
        out: dict[int, list[tuple[FilePlan, Extent]]] = {}
        for f in self.files:
            for e in f.extents:
                out.setdefault(e.rank, []).append((f, e))
        n = len(self.files)
        position = {id(f): i for i, f in enumerate(self.files)}
        for rank, items in out.items():
            start = rank * n // self.world_size  # the position of the first file this rank would own
            k = next((i for i, (f, _) in enumerate(items) if position[id(f)] >= start), 0)
            out[rank] = items[k:] + items[:k]
        return out

    def joined(self, other: "Plan") -> "Plan":
        """Both plans' files written and committed as one save (a model and its optimizer state:
        separate file sets and indexes, one publish)."""
        return Plan(self.world_size, self.files + other.files, {**self.aliases, **other.aliases})

    def part(self, prefix: str) -> "Plan":
        """The files of one file set (see make_plan's prefix)."""
        files = tuple(f for f in self.files if f.name.startswith(prefix + "-"))
        names = {t.name for f in files for t in f.tensors}
        return Plan(self.world_size, files, {a: t for a, t in self.aliases.items() if t in names})

    def weight_map(self) -> dict[str, str]:
        return {t.name: f.name for f in self.files for t in f.tensors}

    def owners(self) -> dict[str, int]:
        return {t.name: f.rank for f in self.files for t in f.tensors}

    def bytes_per_rank(self) -> list[int]:
        """Data bytes each rank writes."""
        out = [0] * self.world_size
        for f in self.files:
            for e in f.extents:
                out[e.rank] += e.end - e.begin
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
    groups = [(tuple(ranks), metas) for ranks, metas in groups]
    order: dict[str, TensorMeta] = {}
    seen_by: dict[str, list] | None = None  # name -> [rank tuples of the groups holding it]
    if len(groups) == 1:  # one rank, or every rank alike (DDP, FSDP): one pass, no bookkeeping
        order = {m.name: m for m in groups[0][1]}
        if len(order) != len(groups[0][1]):  # a name twice in one list: compared as below
            order = {}
    if not order:
        seen_by = {}
        for ranks, metas in groups:
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
            held = seen_by[alias][0] if seen_by is not None else groups[0][0]
            raise PlanError(
                f"tensor {alias!r} is tied to {target!r} on rank(s) {_ranks(alias_src[alias])} "
                f"but is a separate tensor on rank(s) {_ranks(held)}"
            )

    new, prod, sizes = tuple.__new__, math.prod, _itemsizes()
    if seen_by is None:  # one group: the same holders for every whole tensor
        holders = _holders([groups[0][0]], world_size)
        return [new(TensorInfo, (name, m.dtype, m.shape, sizes[m.dtype] * prod(m.shape),
                                 holders if m.layout is None else None))
                for name, m in order.items()], aliases
    infos = []
    for name, m in order.items():
        # A sharded tensor is assembled on its owner, so any rank may own it.
        holders = None if m.layout is not None else _holders(seen_by[name], world_size)
        infos.append(new(TensorInfo, (name, m.dtype, m.shape, sizes[m.dtype] * prod(m.shape), holders)))
    return infos, aliases


class _ItemSizes(dict):
    """safetensors code -> item size; an unknown code raises as fmt.itemsize does."""

    def __missing__(self, code: str) -> int:
        self[code] = size = fmt.itemsize(code)
        return size


_ITEM_SIZES = _ItemSizes()


def _itemsizes() -> _ItemSizes:
    return _ITEM_SIZES


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
    if all(t.holders is None for t in tensors):  # the common case: any rank may own any tensor
        if world_size == 1:
            return [0] * len(tensors)
        by_holders = {None: range(len(tensors))}
    else:
        by_holders: dict[tuple[int, ...] | None, list[int]] = {}
        for i, t in enumerate(tensors):
            by_holders.setdefault(t.holders, []).append(i)
    owners = [0] * len(tensors)
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
    boxes: Mapping[str, Tiling] | None = None,
    prefix: str = "model",
    small_sharded_bytes: int = 0,
) -> Plan:
    """Owner and file of every tensor, the files' global numbering, each tensor's offsets, and the
    rank that writes every byte range.

    boxes: for each sharded tensor (DTensor), per layout (one per replica group), the box of the
    global tensor that each rank holds (ranks holding nothing may be absent or have an empty box).
    Tensors not in it are held whole by their holders, and written by their owner.
    prefix: the files' name prefix (model-00001-of-00004.safetensors, or optimizer-...).
    small_sharded_bytes: a sharded tensor of at most this many bytes (not replicated on any rank)
        is assembled whole on its owner through the exchange rather than written in place.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    aliases = dict(aliases or {})
    names = {t.name for t in tensors}
    for alias, target in aliases.items():
        if target not in names:
            raise PlanError(f"tensor {alias!r} is tied to {target!r}, which is not saved")
    owners = assign_owners(tensors, world_size)

    per_rank: list[list[list[TensorInfo]]] = [[] for _ in range(world_size)]
    if max_shard_size is None:  # one file per rank that owns tensors
        for t, r in zip(tensors, owners):
            files = per_rank[r]
            if files:
                files[0].append(t)
            else:
                files.append([t])
    else:
        sizes: list[int] = [0] * world_size  # bytes in each rank's current (last) file
        for t, r in zip(tensors, owners):
            files = per_rank[r]
            if not files or (files[-1] and sizes[r] + t.nbytes > max_shard_size):
                files.append([])
                sizes[r] = 0
            files[-1].append(t)
            sizes[r] += t.nbytes

    total_files = sum(len(fs) for fs in per_rank)
    out: list[FilePlan] = []
    load = [0] * world_size  # bytes each rank writes so far, to spread the choices
    boxes = boxes or {}
    new = tuple.__new__
    for rank, files in enumerate(per_rank):
        for members in files:
            number = len(out) + 1
            entries, offset = _layout_file(members)
            if boxes and any(e.name in boxes for e in entries):
                extents = _extents([s for e in entries
                                    for s in _segments(e, rank, boxes.get(e.name), load, small_sharded_bytes)])
            else:  # every tensor held whole by its owner, which writes the file's data in one extent
                segments = tuple([new(Segment, (e.name, 0, e.shape[0] if e.shape else 1, e.begin, e.end, rank, False))
                                  for e in entries if e.end != e.begin])
                load[rank] += offset
                extents = (new(Extent, (0, offset, rank, False, segments)),) if segments else ()
            out.append(FilePlan(number, fmt.shard_file_name(number, total_files, prefix), rank, entries, offset,
                                extents))
    return Plan(world_size, tuple(out), aliases)


def _segments(entry: fmt.HeaderEntry, owner: int, tiling: Tiling | None, load: list[int], small: int = 0):
    """Who writes which rows of one tensor (see the module docstring)."""
    nbytes = entry.end - entry.begin
    if nbytes == 0:
        return []
    shape = entry.shape
    rows = shape[0] if shape else 1
    if tiling is None:  # held whole by its owner
        load[owner] += nbytes
        return [Segment(entry.name, 0, rows, entry.begin, entry.end, owner, False)]
    boxes = merged(tiling)
    full = ((0,) * len(shape), tuple(shape))
    whole = [r for r, b in boxes.items() if b == full]
    if whole:  # replicated: its owner writes it if it holds it, else the least loaded holder
        writer = owner if owner in whole else _least_loaded(whole, load)
        load[writer] += nbytes
        return [Segment(entry.name, 0, rows, entry.begin, entry.end, writer, False)]
    if nbytes <= small and shape:  # small and sharded: assembled whole on its owner
        load[owner] += nbytes
        return [Segment(entry.name, 0, rows, entry.begin, entry.end, owner, True)]
    row_bytes = nbytes // rows
    holders: dict[Box, list[int]] = {}
    for r, b in sorted(boxes.items()):
        if is_nonempty(b):
            holders.setdefault(b, []).append(r)
    cuts = sorted({0, rows} | {c for off, shp in holders for c in (off[0], off[0] + shp[0])})
    # The boxes over each band between consecutive cuts (a box spans the bands from its first row
    # to its last): one pass over the boxes, not bands x boxes (1024 FSDP ranks: 1024 of each).
    at = {c: i for i, c in enumerate(cuts)}
    over: list[list[tuple[Box, list[int]]]] = [[] for _ in cuts[1:]]
    for box, ranks in holders.items():
        for i in range(at[box[0][0]], at[box[0][0] + box[1][0]]):
            over[i].append((box, ranks))
    out = []
    for (a, b), band_boxes in zip(zip(cuts, cuts[1:]), over):
        wide = sorted({r for box, ranks in band_boxes if box[1][1:] == shape[1:] for r in ranks})
        if wide:  # one run of the file that these ranks hold: written in place by one of them
            bands, ranks, assembled = [(a, b)], wide, False
        else:  # split by columns: cut into one band per rank holding a piece, each assembled there
            ranks = sorted({r for _, rs in band_boxes for r in rs})
            if not ranks:
                raise PlanError(f"tensor {entry.name!r}: rows {a}-{b} are held by no rank")
            k = min(len(ranks), b - a)
            bands = [(a + (b - a) * j // k, a + (b - a) * (j + 1) // k) for j in range(k)]
            assembled = True
        for lo, hi in bands:
            writer = _least_loaded(ranks, load)
            load[writer] += (hi - lo) * row_bytes
            out.append(Segment(entry.name, lo, hi, entry.begin + lo * row_bytes, entry.begin + hi * row_bytes,
                               writer, assembled))
    return out


def _least_loaded(ranks: Sequence[int], load: list[int]) -> int:
    return min(ranks, key=lambda r: (load[r], r))


def _extents(segments: list[Segment]) -> tuple[Extent, ...]:
    """Adjacent segments of the same rank and kind merge into one extent."""
    out: list[Extent] = []
    run: list[Segment] = []
    for s in segments:
        if run and (s.rank != run[-1].rank or s.assembled != run[-1].assembled or s.begin != run[-1].end):
            out.append(Extent(run[0].begin, run[-1].end, run[0].rank, run[0].assembled, tuple(run)))
            run = []
        run.append(s)
    if run:
        out.append(Extent(run[0].begin, run[-1].end, run[0].rank, run[0].assembled, tuple(run)))
    return tuple(out)


def _layout_file(members: list[TensorInfo]) -> tuple[tuple[fmt.HeaderEntry, ...], int]:
    # Largest item size first: every offset is then a multiple of its tensor's item size.
    sizes = _itemsizes()
    if len({t.dtype for t in members}) > 1:
        members = sorted(members, key=lambda t: -sizes[t.dtype])
    entries = []
    append, new, entry = entries.append, tuple.__new__, fmt.HeaderEntry
    offset = 0
    for t in members:
        end = offset + t.nbytes
        append(new(entry, (t.name, t.dtype, t.shape, offset, end)))
        offset = end
    return tuple(entries), offset
