"""Loading: each rank opens only the files holding its tensors and reads only its byte ranges."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import format as fmt
from .comm import Comm, describe_error, raise_if_failed
from .errors import CheckpointError
from .layout import layout_of
from .progress import Progress
from .reader import open_weights
from .state import alias_key, as_state_dict
from .buffers import StagingBuffer
from .verify import verify_spans

log = logging.getLogger("dist_saver")


@dataclass
class LoadResult:
    path: str
    loaded: list[str] = field(default_factory=list)  # target names filled
    files_opened: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_verified: int = 0  # with verify=True: the bytes of the recorded ranges checked
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)  # target names the checkpoint lacks (left as they were)
    unexpected: list[str] = field(default_factory=list)  # checkpoint names the target lacks (not read)


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
    """Read a Hugging Face checkpoint (ours or any tool's) into a dict of CPU tensors.

    names: only these (aliases included); default all. Tied names share one tensor, as saved.
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
) -> LoadResult:
    """Fill the model's (or state dict's) tensors in place from the checkpoint at path.

    Each rank opens only the files holding its own tensors and, for DTensor targets (FSDP2, TP,
    2-D), reads only its shard's byte ranges. With strict, names the checkpoint lacks or has in
    excess raise CheckpointError; shape or dtype mismatches always do. If a process group is
    initialised, an error on any rank is raised on every rank. The result lists what a
    strict=False load left out: `missing` (target names not in the checkpoint, left untouched)
    and `unexpected` (checkpoint names the target lacks). verify=True first checks the
    recorded checksums of the byte ranges covering what this rank reads (its shard, not the
    whole file, for checkpoints written by several ranks per file). progress: a tqdm bar on rank 0 of the bytes read by
    all ranks (None: when stderr is a terminal and the load takes over 2 s; True; False).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    comm = Comm(process_group)
    result = LoadResult(path)
    error = None
    bar = Progress("load", comm, f"loading {os.path.basename(path)}", progress)
    try:
        _load_into(as_state_dict(model_or_state_dict), path, strict, result, verify, bar)
    except Exception as e:
        error = e
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
    if comm.rank == 0:
        total = sum(r[1] for r in reports)
        slowest = max(range(len(reports)), key=lambda r: reports[r][3])
        seconds = reports[slowest][3]
        log.info("loaded %s: %.3f GB read by %d rank(s) from %d file opens in %.2fs (%.2f GB/s), "
                 "slowest rank %d", path, total / 1e9, len(reports), sum(r[2] for r in reports), seconds,
                 total / seconds / 1e9 if seconds > 0 else 0.0, slowest)
    return result


def _load_into(targets, path: str, strict: bool, result: LoadResult, verify: bool = False,
               progress: Progress | None = None) -> None:
    index = fmt.read_index(path)
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
        if box is None or all(s > 0 for s in box[1]):  # an empty shard needs no file
            reads.setdefault(stored, []).append((name, target, box))
        for other, found in resolved[1:]:
            if found != stored:
                checks.setdefault(found, []).append((other, target))
    result.missing = missing = sorted(missing)
    result.unexpected = unexpected = sorted(n for n in list(index.weight_map) + list(index.aliases)
                                            if n not in targets)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{'...' if len(unexpected) > 10 else ''} (pass strict=False to load the overlap)"
        )
    staging = StagingBuffer()
    by_file = _by_file(index, set(reads) | set(checks))
    if progress is not None:  # the bytes this rank will deliver into its targets
        progress.set_total(sum(math.prod(t.shape if box is None else box[1]) * t.dtype.itemsize
                               for entries in reads.values() for _, t, box in entries))
    if verify and not (index.ours or {}).get("files"):
        raise CheckpointError(f"{index.directory}: no checksums recorded (not written by dist_saver)")
    for file, stored_names in by_file.items():
        result.files_opened.append(file)
        with open_shard(index, file) as f:
            if verify:  # the recorded ranges covering the header and what this rank reads, first
                result.bytes_verified += verify_spans(index, file, [(0, 1)] + [
                    _span(f.info(stored), box) for stored in stored_names for _, _, box in reads.get(stored, [])])
            for stored in stored_names:
                dtype, shape, _ = f.info(stored)
                for name, target, *_ in reads.get(stored, []) + checks.get(stored, []):
                    if tuple(target.shape) != shape or target.dtype != dtype:
                        raise CheckpointError(
                            f"tensor {name!r}: the model has {target.dtype}{list(target.shape)} but file "
                            f"{os.path.join(index.directory, file)} has {dtype}{list(shape)} (stored as {stored!r})"
                        )
                for name, target, box in reads.get(stored, []):
                    local = target.to_local() if box is not None else target
                    with torch.no_grad():
                        result.bytes_read += f.read_into(stored, local.detach(), box, staging)
                    if progress is not None:
                        progress.add(local.numel() * local.element_size())


def _span(info: tuple, box) -> tuple[int, int]:
    """The file bytes from the first to the last row of a box (all of the tensor for None)."""
    dtype, shape, start = info
    if box is None or not shape:
        return start, start + max(1, dtype.itemsize * math.prod(shape))
    row = dtype.itemsize * math.prod(shape[1:])
    return start + box[0][0] * row, start + (box[0][0] + box[1][0]) * row


def _own_box(name: str, target: torch.Tensor):
    """None for a plain tensor; for a DTensor, the (offset, shape) box this rank holds."""
    if layout_of(name, target) is None:  # also rejects layouts that cannot be loaded
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(offset), tuple(shape)
