"""Loading: each rank opens only the files holding its tensors and reads only its byte ranges,
checking their recorded checksums as it reads; the mirror of save.py, on the same machinery.

dist_load runs as steps, each done locally and then agreed on by every rank (comm.step), on a gloo
group of our own whatever the caller's group is: plan (targets, index, headers, checks; the
column-split targets shared), read (this rank's own spans, then the column exchange), then the
optimizer and RNG states are applied once every rank has read everything.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import format as fmt
from .buffers import staging_buffer
from .comm import Comm, own_group
from .errors import CheckpointError, DistSaverWarning
from .index import CheckpointIndex, open_shard, read_index, read_optimizer_index
from .layout import layout_of, rank_boxes
from .load_exchange import ColumnLoader, ColumnRead, make_schedule as make_load_schedule
from .load_plan import Reads, Target, box_items, check, column_targets, mismatch, resolve
from .progress import Progress
from .reader import READ_BATCH, ShardFile
from .state import as_state_dict
from .training import check_param_groups, optimizer_tensors, restore_rng, set_optimizer

log = logging.getLogger("dist_saver")


@dataclass
class LoadResult:
    """What dist_load did on this rank (returned by it; the figures are this rank's own).

    Attributes:
        path: the checkpoint directory loaded.
        loaded: the target names filled (tied names included).
        files_opened: the shard files this rank opened to read (a file once per opening).
        bytes_read: the file bytes this rank read (with verify, the rest of the checksum blocks
            it needed part of included).
        bytes_verified: the bytes whose recorded checksums this rank checked (headers included).
        seconds: this rank's wall time in dist_load.
        train_state: what dist_save(..., train_state=) saved (None if nothing).
        missing: with strict=False, target names the checkpoint lacks (left as they were).
        unexpected: with strict=False, checkpoint names the target lacks (not read).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    files_opened: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_verified: int = 0
    seconds: float = 0.0
    train_state: object = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_state_dict(path: str | os.PathLike, names: Iterable[str] | None = None, *,
                    verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a Hugging Face checkpoint (ours or any tool's) into a dict of CPU tensors, on one process.

    Args:
        path: the checkpoint directory (sharded index, single model.safetensors, or legacy .bin).
        names: only these tensors (tied names included); default all.
        verify: check the recorded checksums of what is read (ours; others record none).

    Returns:
        {name: CPU tensor}; tied names share one tensor, as saved.

    Raises:
        CheckpointError: a name is not in the checkpoint, or the index or a shard file is
            missing, malformed, truncated or damaged.
    """
    with _gc_paused():  # (everything the load made but the tensors is freed before it resumes)
        return _load_state_dict(os.fspath(path), names, verify)


def _load_state_dict(path: str, names, verify: bool) -> dict[str, torch.Tensor]:
    index = read_index(path)
    weight_map, aliases = index.weight_map, index.aliases
    wanted = list(names) if names is not None else list(weight_map) + list(aliases)
    stored_of: dict[str, str] = {}
    for name in wanted:
        stored = name if name in weight_map else aliases.get(name)
        if stored is None or stored not in weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {index.directory}")
        stored_of[name] = stored
    loaded: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for stored in sorted(set(stored_of.values())):
        by_file.setdefault(weight_map[stored], []).append(stored)
    for file, stored_names in by_file.items():
        with open_shard(index, file, verify) as f:
            if not isinstance(f, ShardFile):
                requests = []
                for stored in stored_names:
                    dtype, shape, _ = f.info(stored)
                    loaded[stored] = torch.empty(shape, dtype=dtype)
                    requests.append((stored, loaded[stored], None))
                f.read_many(requests)
                continue
            entries, start = f.entries(), f.data_start
            items: list = []
            outs: list = []
            for stored in stored_names:  # each whole, into new contiguous CPU tensors: one item each
                found = entries.get(stored)
                if found is None:
                    f.info(stored)  # raises, naming the file and the tensor
                dtype, shape, begin = found
                out = loaded[stored] = torch.empty(shape, dtype=dtype)
                n = out.nbytes
                if n:
                    items.append((start + begin, n, len(outs), 0, None, None, None))
                outs.append(out)
            f.read_items(items, outs, None, False)
    return {name: loaded[stored] for name, stored in stored_of.items()}


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused (if it runs) for a stretch of per-tensor work.

    A load of 10^5 tensors allocates a few objects per tensor (a header entry, a plan item, the
    tensor) and makes no garbage in cycles; every 700 allocations start a collection, and the full
    ones walk every live object (the model's tensors too): measured here, a third of the time of a
    load of 50,000 tensors. Paused for a whole call (its collectives included: pausing only
    delays collections), it resumes once the call's objects are freed, collecting as usual."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def dist_load(
    model_or_state_dict,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    process_group=None,
    verify: bool = True,
    progress: bool | None = None,
    optimizer=None,
    restore_rng: bool | None = None,
    timeout: float = 600.0,
) -> LoadResult:
    """Fill the model's (or state dict's) tensors in place from the checkpoint at path.

    Collective when a process group is initialised: every rank of it (or of process_group) calls
    it; its collectives run on a gloo group of our own (the caller's group, NCCL included, only
    says who takes part), each bounded by `timeout`. Each rank opens only the files holding its
    own tensors and, for DTensor targets (FSDP2, TP, 2-D), reads only its shard's byte ranges.
    Shards split by columns (rowwise TP, 2-D), which are not one run of the file, are read once per
    group: the ranks needing a tensor each read a disjoint band of its rows and hand each other the
    column pieces (bounded buckets, one all_to_all per round). CUDA targets are filled through two
    reused pinned buffers, the copy of one block to the device overlapping the read of the next.
    Shapes and dtypes are checked for every tensor on every rank before any is read.

    Args:
        model_or_state_dict: an nn.Module or a mapping of name -> tensor (plain or DTensor),
            filled in place.
        path: the checkpoint directory (ours or any Hugging Face one).
        strict: names the checkpoint lacks or has in excess raise; with False the overlap is
            loaded and the rest listed in the result.
        process_group: the group loading (default: the world's, if initialised).
        verify: check the recorded checksums (ours; other tools record none) of every byte read,
            as it is read: each 1 MiB block a rank reads part of is read and checked whole, the
            files' headers too. False: read only what is needed, unchecked.
        progress: a tqdm bar on rank 0 of the bytes read by all ranks (None: when stderr is a
            terminal and the load takes over 2 s; True; False).
        optimizer: resume a checkpoint saved with optimizer=/train_state=: this optimizer, over
            the model's parameters (pass the model itself), gets its saved state resharded to
            its own layout. Its names, shapes and param_groups are checked on every rank before
            anything (weights included) is read, so a mismatch leaves model and optimizer as
            they were; it takes its new state only once every rank has read everything (state
            tensors are read in place: an I/O error mid-read leaves them undefined, as it does
            the weights).
        restore_rng: set every rank's torch RNG state to the one it had at the save, if the
            world size is the same (otherwise a DistSaverWarning says why not); default: when
            optimizer is given.
        timeout: seconds that bound every collective of the load: a rank that dies, hangs, or
            never calls dist_load makes the others raise a CollectiveError within it.

    Returns:
        LoadResult: this rank's figures; result.train_state is what was saved, and with
        strict=False result.missing / result.unexpected list what was left out.

    Raises:
        CheckpointError: on every rank, if any rank cannot load: the checkpoint is missing,
            damaged (a checksum, header or index check failed), or does not match the target
            (names with strict; shapes and dtypes always), or a target cannot be filled (not a
            tensor, a layout that cannot be loaded such as Partial, optimizer= with a state dict).
            `failures` maps each failing rank to its message, `stage` names the step.
        CollectiveError: a collective broke: another rank died, hung past timeout, or never
            called dist_load (named); raised on the ranks that saw it.
    """
    with _gc_paused():  # (everything the load made is freed before it resumes)
        return _dist_load(model_or_state_dict, os.fspath(path), strict, process_group, verify, progress, optimizer,
                          restore_rng, timeout)


def _dist_load(model_or_state_dict, path: str, strict: bool, process_group, verify: bool, progress, optimizer,
               restore_rng, timeout: float) -> LoadResult:
    t0 = time.perf_counter()
    comm = Comm(own_group(process_group, timeout, "dist_load"), timeout=timeout, op="dist_load")
    result = LoadResult(path)
    bar = Progress("load", comm, f"loading {os.path.basename(path)}", progress)
    load = _Load(model_or_state_dict, path, comm, result, verify)
    try:
        # 1. Plan: targets, index and headers, every check; the column-split targets, shared
        # (nothing is read on any rank unless every rank can load it all).
        with comm.step(f"planning the load of {path}", result="distinct", cls=CheckpointError) as planned:
            load.plan(strict, optimizer, optimizer is not None if restore_rng is None else restore_rng)
            planned.value = load.column_reads()
        schedule = _column_schedule(planned.result, comm) if comm.world_size > 1 else None
        # 2. Read: this rank's own spans, then the column exchange (entered even after a local error).
        with comm.step(f"reading {path}", result="all", cls=CheckpointError) as read:
            try:
                bar.set_total(load.nbytes())
                load.read(schedule, bar)
            finally:
                bar.flush()
            result.seconds = time.perf_counter() - t0
            read.value = (result.bytes_read, len(result.files_opened), result.seconds)
    finally:
        load.close()
        bar.close()
    # 3. Every rank read everything: only now does any rank change its optimizer and RNG.
    load.apply()
    reports = read.result
    if comm.rank == 0:
        total = sum(r[0] for r in reports)
        slowest = max(range(len(reports)), key=lambda r: reports[r][2])
        seconds = reports[slowest][2]
        log.info("loaded %s: %.3f GB read by %d rank(s) from %d file opens in %.2fs (%.2f GB/s), "
                 "slowest rank %d", path, total / 1e9, len(reports), sum(r[1] for r in reports), seconds,
                 total / seconds / 1e9 if seconds > 0 else 0.0, slowest)
    return result


def _column_schedule(groups, comm: Comm):
    """The same load schedule on every rank, from every rank's column reads."""
    reads: dict[tuple, list] = {}
    for _, descs in groups:
        for d in descs:
            if d not in reads.setdefault(d.key, []):
                reads[d.key].append(d)
    return make_load_schedule({k: tuple(v) for k, v in reads.items()}, comm.group_rank)


class _Part:
    """What one rank reads from one index (the model's, or the optimizer's)."""

    def __init__(self, index: CheckpointIndex, targets, reads: Reads, tensors: dict, layouts: dict):
        self.index, self.targets, self.reads = index, targets, reads
        self.tensors = tensors  # target name -> the local tensor to fill
        self.layouts = layouts  # target name -> its Layout (DTensors)
        self.files: dict = {}  # file -> open WeightsFile
        self.columns: set[str] = set()  # stored names read through the load exchange
        self.saved: dict = {}  # the optimizer part: its JSON (param_groups, ...)
        self.planned: dict = {}  # safetensors file -> (items, targets, bytes, any on CUDA): its reads, planned
        self.nbytes_total = 0  # the bytes of every target filled (column-read ones included)

    def open_and_check(self, verify: bool, result: LoadResult) -> None:
        """Open every file, check every target against its header entry, and plan the reads of
        the safetensors files (the items of each, built in the same pass)."""
        for file in self.reads.by_file:
            f = self.files[file] = open_shard(self.index, file, verify)
            if isinstance(f, ShardFile):
                self.planned[file] = self._plan_file(f, file)
            else:
                check(self.reads, file, lambda stored: f.info(stored))
                self.nbytes_total += sum(self.tensors[t.name].nbytes for stored in self.reads.by_file[file]
                                         for t in self.reads.fills.get(stored, ()))

    def _plan_file(self, f: ShardFile, file: str) -> tuple[list, list, int, bool]:
        """(items, targets, bytes, any on CUDA) of one safetensors file: every target checked, and
        the reads of those this rank reads itself (all but the first of a column-read tensor)."""
        entries, data_start = f.entries(), f.data_start
        fills, checks, columns, tensors = self.reads.fills, self.reads.checks, self.columns, self.tensors
        chunk = min(READ_BATCH, staging_buffer().nbytes)
        items: list = []
        outs: list = []
        nbytes, total, pinned = 0, 0, False  # bytes read here, bytes filled (column reads too)
        for stored in self.reads.by_file[file]:
            found = entries.get(stored)
            if found is None:
                f.info(stored)  # raises, naming the file and the tensor
            dtype, shape, begin = found
            ts = fills.get(stored, ())
            for t in ts:
                if t[1] != shape or t[2] != dtype:
                    raise mismatch(t, file, dtype, shape, stored)
            if checks:
                for t in checks.get(stored, ()):
                    if t[1] != shape or t[2] != dtype:
                        raise mismatch(t, file, dtype, shape, stored)
            for k, t in enumerate(ts):
                out = tensors[t[0]]
                n = out.nbytes
                total += n
                if k == 0 and columns and stored in columns:
                    continue  # read through the load exchange
                nbytes += n
                i = len(outs)
                outs.append(out)
                direct = out.is_cpu and out.is_contiguous()
                box = t[3]
                if direct and (box is None or (shape and tuple(box[1][1:]) == shape[1:])):
                    # whole rows (whole tensors, Shard(0)) into contiguous CPU memory: one span, as box_items has it
                    if n:
                        items.append((data_start + begin + (0 if box is None else box[0][0] * (n // box[1][0])),
                                      n, i, 0, None, None, None))
                    continue
                offset, bshape = box if box is not None else ((0,) * len(shape), shape)
                items += box_items(data_start + begin, shape, dtype.itemsize, offset, bshape, direct, i, chunk)
                pinned = pinned or out.is_cuda
        self.nbytes_total += total
        return items, outs, nbytes, pinned

    def nbytes(self) -> int:
        return self.nbytes_total

    def read(self, result: LoadResult, bar: Progress, staging) -> None:
        """This rank's own reads (all but the first target of each column-read tensor)."""
        for file, stored_names in self.reads.by_file.items():
            f = self.files[file]
            planned = self.planned.get(file)
            if planned is not None:
                items, outs, nbytes, pinned = planned
                if not outs:
                    continue
                result.files_opened.append(file)
                with torch.no_grad():
                    result.bytes_read += f.read_items(items, outs, staging, pinned)
                bar.add(nbytes)
                continue
            requests = []
            for stored in stored_names:
                ts = self.reads.fills.get(stored, [])
                for t in ts[1:] if stored in self.columns else ts:
                    requests.append((stored, self.tensors[t.name], t.box))
            if not requests:
                continue
            result.files_opened.append(file)
            with torch.no_grad():
                result.bytes_read += f.read_many(requests, staging)
            bar.add(sum(out.nbytes for _, out, _ in requests))

    def close(self, result: LoadResult) -> None:
        for f in self.files.values():
            result.bytes_verified += getattr(f, "bytes_checked", 0)
            f.close()
        self.files = {}


class _Load:
    """One rank's load: its parts, planned and checked, then read, then applied."""

    def __init__(self, model_or_state_dict, path: str, comm: Comm, result: LoadResult, verify: bool):
        self.model, self.path, self.comm, self.result, self.verify = model_or_state_dict, path, comm, result, verify
        self.parts: list[_Part] = []
        self.optimizer = None
        self.train: dict | None = None
        self.rng = False

    def plan(self, strict: bool, optimizer, rng: bool) -> None:
        targets = as_state_dict(self.model)
        index = read_index(self.path)
        self.parts.append(_plan_part(index, targets, strict, self.result, self.comm))
        if optimizer is not None:
            self.parts.append(_optimizer_part(self.model, optimizer, self.path, self.comm))
            self.optimizer = optimizer
        self.train, self.rng = _train_state(self.path), rng
        for part in self.parts:  # every header, shape, dtype and checksum of a header before a byte is read
            part.open_and_check(self.verify, self.result)

    def column_reads(self) -> list[ColumnRead]:
        out = []
        for i, part in enumerate(self.parts):
            for stored in sorted(part.columns):
                t = part.reads.fills[stored][0]
                out.append(ColumnRead((i, stored), part.index.weight_map[stored], t.shape, fmt.dtype_code(t.dtype),
                                      part.layouts[t.name]))
        return out

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def read(self, schedule, bar: Progress) -> None:
        staging = staging_buffer()  # CUDA targets: pinned double buffer, copies on a side stream
        error = None
        try:
            for part in self.parts:
                part.read(self.result, bar, staging)
        except Exception as e:  # the exchange still runs: the other ranks wait for this rank's part
            error = e
        finally:
            staging.finish()  # every copy to the device done before the targets are used
        if schedule is not None and schedule.rounds:
            self._exchange(schedule, bar)
        if error is not None:
            raise error

    def _exchange(self, schedule, bar: Progress) -> None:
        targets, opened = {}, set()
        for i, part in enumerate(self.parts):
            for stored in part.columns:
                targets[(i, stored)] = part.tensors[part.reads.fills[stored][0].name]

        def open_tensor(key):
            part = self.parts[key[0]]
            file = part.index.weight_map[key[1]]
            if file not in opened:
                opened.add(file)
                if file not in self.result.files_opened:
                    self.result.files_opened.append(file)
            return part.files[file]

        loader = ColumnLoader(schedule, self.comm, targets, open_tensor, bar)
        try:
            with torch.no_grad():
                loader.run()
        finally:
            self.result.bytes_read += loader.bytes_read

    def close(self) -> None:
        for part in self.parts:
            part.close(self.result)

    def apply(self) -> None:
        if self.optimizer is not None:
            part = self.parts[1]
            set_optimizer(self.model, self.optimizer, part.targets, part.saved)
        self.result.train_state = self.train.get("train_state") if self.train else None
        _restore_rng(self.train, self.comm, self.rng)


# Target(...) without NamedTuple's Python-level __new__: a plan builds one per tensor
_new_target = tuple.__new__


def _tie_groups(targets) -> tuple[list[list[Target]], dict, dict]:
    """The targets as the plan sees them, grouped by shared memory (tied weights), with the local
    tensor to fill and the layout of each.

    Two targets are one memory when their (local) tensors start at the same address with the same
    dtype, shape, strides and device, and placements (DTensors); empty and meta tensors are no
    memory. Grouped by address, the full keys compared only where two targets share one."""
    with torch.no_grad():  # (DTensor.to_local without autograd's bookkeeping)
        return _tie_groups_of(targets)


def _tie_groups_of(targets) -> tuple[list[list[Target]], dict, dict]:
    groups: list[list[Target]] = []
    tensors, layouts = {}, {}
    by_ptr: dict = {}  # data address -> [(target entry, its local tensor, its group)]
    boxes: dict = {}  # DTensors: (global shape, id of its layout) -> (the layout, this rank's box)
    rank = None
    for name, t in targets.items():
        cls = t.__class__
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            layout = None
        elif isinstance(t, torch.Tensor):
            layout = layout_of(name, t)  # also rejects layouts that cannot be loaded
        else:
            raise TypeError(f"target entry {name!r} is a {type(t).__name__}, not a tensor")
        if layout is None:  # a plain tensor
            local = t
            target = _new_target(Target, (name, tuple(t.shape), t.dtype, None))
        else:  # a DTensor: this rank's box, by the layout code the save uses (layout_of checked the local piece)
            shape = tuple(t.shape)
            hit = boxes.get((shape, id(layout)))
            if hit is None or hit[0] is not layout:
                if rank is None:
                    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                hit = boxes[(shape, id(layout))] = (layout, rank_boxes(shape, layout)[rank])
            layouts[name] = layout
            local = t.to_local()
            target = _new_target(Target, (name, shape, t.dtype, hit[1]))
        local = tensors[name] = local.detach() if local.requires_grad else local
        ptr = local.data_ptr()
        if not ptr or not local.numel():  # empty and meta tensors share no memory
            groups.append([target])
            continue
        bucket = by_ptr.get(ptr)
        if bucket is None:
            by_ptr[ptr] = [(t, local, group := [target])]
            groups.append(group)
            continue
        key = _memory_key(t, local)
        for other, other_local, group in bucket:
            if _memory_key(other, other_local) == key:
                group.append(target)
                break
        else:
            bucket.append((t, local, group := [target]))
            groups.append(group)
    return groups, tensors, layouts


def _memory_key(t: torch.Tensor, local: torch.Tensor) -> tuple:
    return local.device, local.dtype, tuple(local.shape), local.stride(), tuple(getattr(t, "placements", ()))


def _plan_part(index: CheckpointIndex, targets, strict: bool, result: LoadResult | None, comm: Comm) -> _Part:
    groups, tensors, layouts = _tie_groups(targets)
    reads = resolve(index.weight_map, index.aliases, groups, list(index.weight_map) + list(index.aliases),
                    strict, index.directory)
    if result is not None:
        result.loaded, result.missing, result.unexpected = reads.loaded, reads.missing, reads.unexpected
    part = _Part(index, targets, reads, tensors, layouts)
    if comm.world_size > 1:
        part.columns = column_targets(reads, layouts, lambda ranks: all(comm.group_rank(r) >= 0 for r in ranks))
    return part


def _optimizer_part(model, optimizer, path: str, comm: Comm) -> _Part:
    """The optimizer's part: its state tensors (initialised if it never stepped) as targets."""
    index = read_optimizer_index(path)
    if index is None:
        raise CheckpointError(f"{path}: no {fmt.OPTIM_INDEX_NAME}: this checkpoint was saved without an "
                              "optimizer (pass optimizer= to dist_save to make a resumable checkpoint)")
    where = os.path.join(index.directory, fmt.OPTIM_INDEX_NAME)
    saved = (index.ours or {}).get("optimizer")
    if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])
            and isinstance(saved.get("state_values", {}), dict)):
        raise CheckpointError(f"{where}: field metadata.{fmt.META_KEY}.optimizer is not "
                              "{param_groups: [{params: [...], ...}], state_values: {...}}")
    targets, now = optimizer_tensors(model, optimizer)
    check_param_groups(saved, {n for g in now["param_groups"] for n in g["params"]}, where)
    if len(saved["param_groups"]) != len(now["param_groups"]):
        raise CheckpointError(f"{where}: the saved optimizer has {len(saved['param_groups'])} param_groups, "
                              f"this one {len(now['param_groups'])}")
    try:  # the model's names, missing and unexpected stay the model's
        part = _plan_part(index, targets, True, None, comm)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: the saved optimizer state does not match this optimizer's: "
                              f"{str(e).split(': ', 1)[-1]}") from None
    part.saved = saved
    return part


def _train_state(path: str) -> dict | None:
    """train_state.json of a training checkpoint (None if there is none)."""
    full = os.path.join(path, fmt.TRAIN_STATE_NAME)
    if not os.path.isfile(full):
        return None
    fmt.safe_member(path, fmt.TRAIN_STATE_NAME)
    with open(full, "rb") as f:
        doc = fmt.parse_json(full, f.read(), "the train state")
    if not (isinstance(doc, dict) and "train_state" in doc and isinstance(doc.get("rng", []), list)
            and isinstance(doc.get("world_size", 0), int)):
        raise CheckpointError(f"{full}: not a train state ({{train_state, world_size, rng: [...]}})")
    return doc


def _restore_rng(train: dict | None, comm: Comm, wanted: bool) -> None:
    if not wanted or train is None:
        return
    rngs = train.get("rng") or []
    if train.get("world_size") != comm.world_size or len(rngs) != comm.world_size:
        warnings.warn(f"the RNG states were saved by {train.get('world_size')} rank(s); this load has "
                      f"{comm.world_size}: they are not restored (each rank keeps its own)", DistSaverWarning,
                      stacklevel=4)
        return
    try:
        restore_rng(rngs[comm.rank])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{fmt.TRAIN_STATE_NAME}: rank {comm.rank}'s RNG state cannot be restored: {e}") from None

