"""Rewriting checkpoints in parallel: a PyTorch DCP checkpoint (e.g. torchtitan's) into our layout
(convert_dcp), or one of ours / any HF checkpoint with another file split (reshard).

Every rank reads the source's metadata, computes the same owner plan as dist_save would, loads only
the tensors it owns and writes them into its own file(s) once. No single-process consolidation, no
second copy on disk; memory per rank is the tensors it owns (about 1/N of the model).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from . import format as fmt
from .comm import Comm, own_group
from .plan import TensorInfo, make_plan
from .errors import CheckpointError
from .index import open_weights, read_index
from .save import dist_save

log = logging.getLogger("dist_saver")


def _rewrite(tensors: list[TensorInfo], load: Callable[[list[str]], dict], dst: str, process_group,
             save_kwargs: dict, aliases: dict | None = None):
    comm = Comm(process_group)
    owners = make_plan(tensors, comm.world_size).owners()  # the owners dist_save would choose
    mine = load([t.name for t in tensors if owners[t.name] == comm.rank])
    for alias, target in (aliases or {}).items():  # tied names travel with their tensor
        if target in mine:
            mine[alias] = mine[target]
    # Each tensor now lives on exactly one rank, so dist_save keeps it there: no bytes move.
    return dist_save(mine, dst, process_group=process_group, **save_kwargs)


def _info(name: str, dtype: torch.dtype, shape) -> TensorInfo:
    shape = tuple(int(s) for s in shape)
    return TensorInfo(name, fmt.dtype_code(dtype), shape, fmt.nbytes(shape, dtype))


def convert_dcp(src: str | os.PathLike, dst: str | os.PathLike, *, process_group=None, **save_kwargs):
    """Collective: convert the DCP checkpoint at src into a safetensors checkpoint at dst.

    Every rank of the group calls it; each reads (through DCP) only the tensors it then writes.
    Non-tensor entries (DCP "bytes" items such as a step counter) are skipped with a warning.

    Args:
        src: a torch.distributed.checkpoint directory written by FileSystemWriter (e.g. torchtitan's).
        dst: the checkpoint directory to write (as dist_save's path).
        process_group: the ranks that convert together (None: the default group, or one process).
        **save_kwargs: passed to dist_save (max_shard_size, overwrite, checksums, ...).

    Returns:
        dist_save's SaveResult (an AsyncSave handle with async_save=True).

    Raises:
        OSError (or DCP's own errors): src is not a readable DCP checkpoint.
        SaveError, ValueError: as dist_save (dst not replaceable, a bad size, a rank failed...).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, dst = os.fspath(src), os.fspath(dst)
    comm = Comm(process_group)
    metadata = dcp.FileSystemReader(src).read_metadata()
    tensors, skipped = [], []
    for name, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            tensors.append(_info(name, md.properties.dtype, md.size))
        else:
            skipped.append(name)
    if skipped and comm.rank == 0:
        log.warning("convert_dcp: skipping %d non-tensor entries: %s", len(skipped), skipped[:10])
    by_name = {t.name: t for t in tensors}

    def load(names):
        mine = {n: torch.empty(by_name[n].shape, dtype=fmt.torch_dtype(by_name[n].dtype)) for n in names}
        # collective: every rank calls it, each for its own tensors; DCP reads only their pieces.
        # Its collectives carry host objects: on our gloo group, whatever the caller's group is.
        group = own_group(process_group, float(save_kwargs.get("timeout", 600.0)), "convert_dcp")
        dcp.load(mine, storage_reader=dcp.FileSystemReader(src), process_group=group, no_dist=not comm.active)
        return mine

    return _rewrite(tensors, load, dst, process_group, save_kwargs)


def reshard(src: str | os.PathLike, dst: str | os.PathLike, *, process_group=None, **save_kwargs):
    """Collective: rewrite the checkpoint at src (ours or any HF one, safetensors or legacy .bin)
    at dst, e.g. with another max_shard_size or, under torchrun, another number of writers.

    Every rank of the group calls it; each reads only the tensors it then writes. Tied names (our
    aliases, or one tensor under two names in a .bin) are kept, and stored once.

    Args:
        src: the checkpoint directory, or a single weights file.
        dst: the checkpoint directory to write (as dist_save's path).
        process_group: the ranks that rewrite together (None: the default group, or one process).
        **save_kwargs: passed to dist_save (max_shard_size, overwrite, checksums, ...).

    Returns:
        dist_save's SaveResult (an AsyncSave handle with async_save=True).

    Raises:
        CheckpointError: src is not a complete or readable checkpoint (missing index or shard,
            malformed header, a .bin holding more than tensors).
        SaveError, ValueError: as dist_save (dst not replaceable, a bad size, a rank failed...).
    """
    from .load import load_state_dict

    src, dst = os.fspath(src), os.fspath(dst)
    index = read_index(src)
    aliases = dict(index.aliases)
    tensors: list[tuple[str, int, TensorInfo]] = []
    for file in sorted(set(index.weight_map.values())):
        with open_weights(fmt.safe_member(index.directory, file)) as f:
            ties = f.ties()
            for position, name in enumerate(f.names()):
                if index.weight_map.get(name) != file:
                    continue
                if ties.get(name, name) != name and index.weight_map.get(ties[name]) == file:
                    aliases[name] = ties[name]  # the same tensor under two names: store it once
                    continue
                dtype, shape, offset = f.info(name)
                # a .bin has no data offsets: the order it lists its tensors in stands for them
                tensors.append((file, position if offset is None else offset, _info(name, dtype, shape)))
    tensors.sort(key=lambda x: (x[0], x[1]))  # on-disk order: neighbours stay together
    return _rewrite([t for _, _, t in tensors], lambda names: load_state_dict(src, names), dst,
                    process_group, save_kwargs, aliases)


def convert_legacy(src: str | os.PathLike, dst: str | os.PathLike, *, process_group=None, **save_kwargs):
    """Collective: rewrite a legacy checkpoint (pytorch_model.bin, or shards listed in
    pytorch_model.bin.index.json; read with weights_only=True) into our safetensors layout.
    The legacy files are read through memory maps; each rank reads only the tensors it writes.

    Args:
        src: the directory holding pytorch_model.bin or its index, or one .bin/.pt/.pth file.
        dst, process_group, **save_kwargs: as for reshard (which this is, once src is checked).

    Returns:
        dist_save's SaveResult (an AsyncSave handle with async_save=True).

    Raises:
        CheckpointError: src is already a safetensors checkpoint (use reshard), or is not a
            readable legacy checkpoint (a file holding more than tensors is refused unread).
        SaveError, ValueError: as dist_save (dst not replaceable, a bad size, a rank failed...).
    """
    index = read_index(os.fspath(src))
    if not all(fmt.is_legacy_file(f) for f in index.weight_map.values()):
        raise CheckpointError(f"{index.directory}: already a safetensors checkpoint; use reshard to rewrite it")
    return reshard(src, dst, process_group=process_group, **save_kwargs)
