"""Loading: each rank opens only the files holding its tensors and reads only its byte ranges."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import format as fmt
from .comm import Comm, describe_error, own_group, raise_if_failed
from .errors import CheckpointError, DistSaverWarning
from .layout import Layout, is_nonempty, layout_of, rank_boxes
from .format import nbytes
from .progress import Progress
from .reader import is_one_run, open_weights
from .state import alias_key, as_state_dict
from .buffers import staging_buffer
from .load_exchange import ColumnLoader, ColumnRead, make_schedule as make_load_schedule
from .training import check_param_groups, optimizer_tensors, restore_rng, set_optimizer
from .verify import verify_spans

log = logging.getLogger("dist_saver")


@dataclass
class LoadResult:
    """What dist_load did on this rank (returned by it; the figures are this rank's own).

    Attributes:
        path: the checkpoint directory loaded.
        loaded: the target names filled (tied names included).
        files_opened: the shard files this rank opened to read (a file once per opening).
        bytes_read: the tensor bytes this rank read from the files.
        bytes_verified: with verify=True, the bytes of the recorded checksum ranges checked.
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


def _resolve(index: fmt.CheckpointIndex, name: str) -> str | None:
    """The stored name that holds `name` (itself, or the tensor it is tied to)."""
    if name in index.weight_map:
        return name
    target = index.aliases.get(name)
    return target if target in index.weight_map else None


def _by_file(index: fmt.CheckpointIndex, stored: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in sorted(stored):
        out.setdefault(index.weight_map[s], []).append(s)
    return out


def open_shard(index: fmt.CheckpointIndex, file: str):
    path = fmt.safe_member(index.directory, file)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: shard file missing")
    return open_weights(path)


def load_state_dict(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a Hugging Face checkpoint (ours or any tool's) into a dict of CPU tensors, on one process.

    Args:
        path: the checkpoint directory (sharded index, single model.safetensors, or legacy .bin).
        names: only these tensors (tied names included); default all.

    Returns:
        {name: CPU tensor}; tied names share one tensor, as saved.

    Raises:
        CheckpointError: a name is not in the checkpoint, or the index or a shard file is
            missing, malformed or truncated.
    """
    index = fmt.read_index(os.fspath(path))
    wanted = list(names) if names is not None else list(index.weight_map) + list(index.aliases)
    stored_of: dict[str, str] = {}
    for name in wanted:
        stored = _resolve(index, name)
        if stored is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {index.directory}")
        stored_of[name] = stored
    loaded: dict[str, torch.Tensor] = {}
    for file, stored_names in _by_file(index, set(stored_of.values())).items():
        with open_shard(index, file) as f:
            for stored in stored_names:
                dtype, shape, _ = f.info(stored)
                loaded[stored] = torch.empty(shape, dtype=dtype)
                f.read_into(stored, loaded[stored])
    return {name: loaded[stored] for name, stored in stored_of.items()}


def dist_load(
    model_or_state_dict,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    process_group=None,
    verify: bool = False,
    progress: bool | None = None,
    optimizer=None,
    restore_rng: bool | None = None,
    timeout: float = 600.0,
) -> LoadResult:
    """Fill the model's (or state dict's) tensors in place from the checkpoint at path.

    Collective when a process group is initialised: every rank of it (or of process_group) calls
    it. Each rank opens only the files holding its own tensors and, for DTensor targets (FSDP2,
    TP, 2-D), reads only its shard's byte ranges. Shards split by columns (rowwise TP, 2-D), which
    are not one run of the file, are read once per group: the ranks needing a tensor each read a
    disjoint band of its rows and hand each other the column pieces (bounded buckets, one
    all_to_all per round). CUDA targets are filled through two reused pinned buffers, the copy of
    one block to the device overlapping the read of the next. Shapes and dtypes (and checksums,
    with verify) are checked for every tensor on every rank before any is read.

    Args:
        model_or_state_dict: an nn.Module or a mapping of name -> tensor (plain or DTensor),
            filled in place.
        path: the checkpoint directory (ours or any Hugging Face one).
        strict: names the checkpoint lacks or has in excess raise; with False the overlap is
            loaded and the rest listed in the result.
        process_group: the group loading (default: the world's, if initialised).
        verify: first check the recorded checksums of the byte ranges covering what this rank
            reads (its shard, not the whole file, for files written by several ranks).
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

    Returns:
        LoadResult: this rank's figures; result.train_state is what was saved, and with
        strict=False result.missing / result.unexpected list what was left out.

    Raises:
        CheckpointError: the checkpoint is missing, damaged, fails verify, or does not match
            the target (names with strict; shapes and dtypes always). With a process group an
            error on any rank is raised on every rank, as a CheckpointError naming the ranks.
        TypeError: a target entry is not a tensor, or optimizer= is given with a state dict.
        ValueError: a DTensor target has a layout that cannot be loaded (e.g. Partial).
        CollectiveError: a collective broke (another rank died or timed out).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    comm = Comm(own_group(process_group, timeout, "dist_load"), timeout=timeout, op="dist_load")
    result = LoadResult(path)
    error = None
    bar = Progress("load", comm, f"loading {os.path.basename(path)}", progress)
    try:
        targets = as_state_dict(model_or_state_dict)
        index = fmt.read_index(path)
        parts = [_plan_reads(targets, index, strict, result, comm)]
        if optimizer is not None:
            parts.append(_optimizer_reads(model_or_state_dict, optimizer, path, result, comm))
        train = _train_state(path, optimizer is not None if restore_rng is None else restore_rng)
        for part in parts:  # every shape and dtype, and every checksum asked for, before a byte is read
            part.check()
        if verify:
            for part in parts:
                part.verify(result)
        columns = [c for i, part in enumerate(parts) for c in part.column_reads(i)]
    except Exception as e:
        error = e
        parts, columns = [], []
    # Nothing is read on any rank unless every rank can load it all; the same collective shares
    # what each rank needs as column pieces (read once per group, see load_exchange).
    schedule = None
    if comm.world_size > 1:
        bar.flush()
        try:
            groups = comm.gather_deduplicated(columns, error, f"loading {path}", CheckpointError)
        except BaseException:
            bar.close()
            raise
        schedule = _column_schedule(groups, comm)
    elif error is not None:
        raise error
    try:
        bar.set_total(sum(p.nbytes() for p in parts))  # the bytes this rank will deliver
        for part in parts:
            part.read(result, bar)
    except Exception as e:
        error = e
    if schedule is not None and schedule.rounds:  # collective: even after a local error above
        try:
            _run_columns(schedule, comm, parts, result, bar)
        except Exception as e:
            error = error or e
    result.seconds = time.perf_counter() - t0
    bar.flush()
    try:
        if comm.world_size == 1 and error is not None:
            raise error
        # One collective: every rank learns of any error, and rank 0 of everyone's figures.
        reports = comm.all_gather_object(
            (describe_error(error), result.bytes_read, len(result.files_opened), result.seconds))
    finally:
        bar.close()
    raise_if_failed([r[0] for r in reports], f"loading {path}", CheckpointError)
    # Every rank read everything: only now does any rank change its optimizer and RNG.
    if optimizer is not None:
        set_optimizer(model_or_state_dict, optimizer, parts[1].targets, parts[1].saved)
    result.train_state = train.get("train_state") if train else None
    _restore_rng(train, comm, optimizer is not None if restore_rng is None else restore_rng)
    if comm.rank == 0:
        total = sum(r[1] for r in reports)
        slowest = max(range(len(reports)), key=lambda r: reports[r][3])
        seconds = reports[slowest][3]
        log.info("loaded %s: %.3f GB read by %d rank(s) from %d file opens in %.2fs (%.2f GB/s), "
                 "slowest rank %d", path, total / 1e9, len(reports), sum(r[2] for r in reports), seconds,
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


def _run_columns(schedule, comm: Comm, parts, result: LoadResult, bar) -> None:
    targets, files, opened = {}, {}, {}
    for i, part in enumerate(parts):
        for stored, (target, _) in part.columns.items():
            targets[(i, stored)] = target.to_local().detach()
    for c in schedule.chunks:  # the files of the chunks this rank reads
        if c.reader == comm.rank:
            i, stored = c.key
            files[c.key] = (parts[i].index, parts[i].index.weight_map[stored])

    def open_tensor(key):
        index, file = files[key]
        if file not in opened:
            opened[file] = open_shard(index, file)
            result.files_opened.append(file)
        return opened[file]

    loader = ColumnLoader(schedule, comm, targets, open_tensor, bar)
    try:
        with torch.no_grad():
            loader.run()
    finally:
        result.bytes_read += loader.bytes_read
        for f in opened.values():
            f.close()


class _Reads:
    """What one rank reads from one index (the model's, or the optimizer's): planned, checked
    against the files' headers, then read."""

    def __init__(self, index: fmt.CheckpointIndex, targets, reads, checks, comm: Comm | None = None):
        self.index, self.targets = index, targets
        self.reads = reads  # stored name -> [(target name, tensor, box or None)]
        self.checks = checks  # stored name -> [(tied target name, tensor)]: shape and dtype only
        self.by_file = _by_file(index, set(reads) | set(checks))
        self.saved: dict = {}
        # stored name -> (a DTensor target whose box is split by columns, not one run of the file;
        # its layout): read once per group through the load exchange instead of directly
        self.columns: dict[str, tuple[torch.Tensor, Layout]] = {}
        if comm is None or comm.world_size == 1:
            return
        for stored, entries in reads.items():
            name, target, box = entries[0]
            if box is None or is_one_run(tuple(target.shape), *box):
                continue
            layout = layout_of(name, target)
            if all(comm.group_rank(r) >= 0 for r in layout.mesh_ranks):
                self.columns[stored] = (target, layout)

    def column_reads(self, part: int) -> list[ColumnRead]:
        return [ColumnRead((part, stored), self.index.weight_map[stored], tuple(t.shape), fmt.dtype_code(t.dtype),
                           layout) for stored, (t, layout) in sorted(self.columns.items())]

    def nbytes(self) -> int:
        return sum(nbytes(t.shape if box is None else box[1], t.dtype)
                   for entries in self.reads.values() for _, t, box in entries)

    def _direct(self, stored: str) -> list:
        entries = self.reads.get(stored, [])
        return entries[1:] if stored in self.columns else entries

    def check(self) -> None:
        for file, stored_names in self.by_file.items():
            with open_shard(self.index, file) as f:
                for stored in stored_names:
                    self._check(f, file, stored)

    def _check(self, f, file: str, stored: str) -> None:
        dtype, shape, _ = f.info(stored)
        for name, target, *_ in self.reads.get(stored, []) + self.checks.get(stored, []):
            if tuple(target.shape) != shape or target.dtype != dtype:
                raise CheckpointError(
                    f"tensor {name!r}: the model has {target.dtype}{list(target.shape)} but file "
                    f"{os.path.join(self.index.directory, file)} has {dtype}{list(shape)} (stored as {stored!r})"
                )

    def verify(self, result: LoadResult) -> None:
        """The recorded checksums of the ranges covering the headers and what this rank reads."""
        index = self.index
        if not (index.ours or {}).get("files"):
            raise CheckpointError(f"{index.directory}: no checksums recorded (not written by dist_saver)")
        for file, stored_names in self.by_file.items():
            with open_shard(index, file) as f:
                result.bytes_verified += verify_spans(index, file, [(0, 1)] + [
                    _span(f.info(stored), box) for stored in stored_names for _, _, box in self.reads.get(stored, [])])

    def read(self, result: LoadResult, progress: Progress | None) -> None:
        index = self.index
        staging = staging_buffer()  # CUDA targets: pinned double buffer, copies on a side stream
        try:
            for file, stored_names in self.by_file.items():
                if not any(self._direct(stored) for stored in stored_names):
                    continue  # only column pieces here: the load exchange reads them
                result.files_opened.append(file)
                with open_shard(index, file) as f:
                    for stored in stored_names:
                        self._check(f, file, stored)  # again: the file may have changed since
                        for name, target, box in self._direct(stored):
                            local = target.to_local() if box is not None else target
                            with torch.no_grad():
                                result.bytes_read += f.read_into(stored, local.detach(), box, staging)
                            if progress is not None:
                                progress.add(nbytes(local.shape, local.dtype))
        finally:
            staging.finish()  # every copy to the device done before the targets are used


def _plan_reads(targets, index: fmt.CheckpointIndex, strict: bool, result: LoadResult,
                comm: Comm | None = None) -> _Reads:
    # Tied target tensors share memory: fill each memory once, from whichever name is stored.
    groups: dict = {}
    for name, t in targets.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"target entry {name!r} is a {type(t).__name__}, not a tensor")
        key = alias_key(t)
        groups.setdefault(key if key is not None else ("name", name), []).append(name)
    # stored name -> [(target name, tensor to fill, box of the global tensor or None for all)]
    reads: dict[str, list[tuple[str, torch.Tensor, tuple | None]]] = {}
    # stored name -> [(target name, tensor)]: tied names resolving to another stored tensor than
    # the one read; their dtype and shape must match it too (an alias leading elsewhere is damage)
    checks: dict[str, list[tuple[str, torch.Tensor]]] = {}
    missing = []
    for names in groups.values():
        resolved = [(n, found) for n, found in ((n, _resolve(index, n)) for n in names) if found is not None]
        if not resolved:
            missing.extend(names)
            continue
        result.loaded.extend(names)
        name, stored = resolved[0]
        target = targets[name]
        box = _own_box(name, target)
        if box is None or is_nonempty(box):  # an empty shard needs no file
            reads.setdefault(stored, []).append((name, target, box))
        for other, found in resolved[1:]:
            if found != stored:
                checks.setdefault(found, []).append((other, target))
    result.missing = missing = sorted(missing)
    result.unexpected = unexpected = sorted(n for n in list(index.weight_map) + list(index.aliases)
                                            if n not in targets)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {index.directory} does not match the model: missing {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{'...' if len(unexpected) > 10 else ''} (pass strict=False to load the overlap)"
        )
    return _Reads(index, targets, reads, checks, comm)


def _optimizer_reads(model, optimizer, path: str, result: LoadResult, comm: Comm) -> _Reads:
    """The optimizer's part: its state tensors (initialised if it never stepped) as targets."""
    index = fmt.read_optimizer_index(path)
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
    bookkeeping = LoadResult(path)  # the model's names, missing and unexpected stay the model's
    try:
        reads = _plan_reads(targets, index, True, bookkeeping, comm)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: the saved optimizer state does not match this optimizer's: "
                              f"{str(e).split(': ', 1)[-1]}") from None
    reads.saved = saved
    return reads


def _train_state(path: str, needed: bool) -> dict | None:
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
                      stacklevel=3)
        return
    try:
        restore_rng(rngs[comm.rank])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{fmt.TRAIN_STATE_NAME}: rank {comm.rank}'s RNG state cannot be restored: {e}") from None


def _span(info: tuple, box) -> tuple[int, int]:
    """The file bytes from the first to the last row of a box (all of the tensor for None)."""
    dtype, shape, start = info
    if box is None or not shape:
        return start, start + max(1, nbytes(shape, dtype))
    row = nbytes(shape[1:], dtype)
    return start + box[0][0] * row, start + (box[0][0] + box[1][0]) * row


def _own_box(name: str, target: torch.Tensor):
    """None for a plain tensor; for a DTensor, the (offset, shape) box this rank holds."""
    layout = layout_of(name, target)  # also rejects layouts that cannot be loaded
    if layout is None:
        return None
    # the layout code the save uses (layout_of checked that it matches the local piece)
    return rank_boxes(tuple(target.shape), layout)[torch.distributed.get_rank()]
