"""convert_dcp: a PyTorch DCP checkpoint (e.g. torchtitan's) into our Hugging Face layout, in parallel.

Every rank reads DCP's metadata, computes the same owner plan as dist_save would, loads only the
tensors it owns (DCP reads just their pieces from the .distcp files) and writes them into its own
file(s) once. No single-process consolidation, no second copy on disk.
"""

from __future__ import annotations

import logging
import os

import torch

from . import format as fmt
from .comm import Comm
from .plan import TensorInfo, make_plan
from .save import dist_save

log = logging.getLogger("dist_saver")


def convert_dcp(src: str | os.PathLike, dst: str | os.PathLike, *, process_group=None, **save_kwargs):
    """Collective: convert the DCP checkpoint at src into a safetensors checkpoint at dst.

    Non-tensor entries (DCP "bytes" items such as a step counter) are skipped with a warning.
    Memory per rank: the tensors it owns (about 1/N of the model). save_kwargs go to dist_save.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, dst = os.fspath(src), os.fspath(dst)
    comm = Comm(process_group)
    metadata = dcp.FileSystemReader(src).read_metadata()
    tensors, skipped = [], []
    for name, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            skipped.append(name)
            continue
        shape = tuple(md.size)
        code = fmt.dtype_code(md.properties.dtype)
        nbytes = md.properties.dtype.itemsize
        for s in shape:
            nbytes *= s
        tensors.append(TensorInfo(name, code, shape, nbytes))
    if skipped and comm.rank == 0:
        log.warning("convert_dcp: skipping %d non-tensor entries: %s", len(skipped), skipped[:10])
    owners = make_plan(tensors, comm.world_size).owners()  # the owners dist_save would choose
    mine = {t.name: torch.empty(t.shape, dtype=fmt.torch_dtype(t.dtype)) for t in tensors
            if owners[t.name] == comm.rank}
    dcp.load(mine, storage_reader=dcp.FileSystemReader(src), process_group=process_group,
             no_dist=not comm.active)
    # Each tensor now lives on exactly one rank, so dist_save keeps it there: no bytes move.
    return dist_save(mine, dst, process_group=process_group, **save_kwargs)
