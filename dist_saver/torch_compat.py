"""The private torch APIs dist_saver relies on, each behind one function.

torch moves or changes private names between releases; keeping every use here means an upgrade
breaks in one place, and tests/test_torch_compat.py names the API that changed. Imports are lazy
so that importing dist_saver does not load torch.distributed.tensor.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch.distributed as dist


@functools.cache
def strided_shard_type() -> type | None:
    """torch.distributed.tensor.placement_types._StridedShard (FSDP2 over tensor parallel shards
    one dim "right to left" with it), or None in a torch without it."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return None
    return _StridedShard


def local_shape_and_offset(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of the piece at `coordinate` of a mesh of `mesh_shape`:
    DTensor's own shard arithmetic (torch.distributed.tensor._utils.
    _compute_local_shape_and_global_offset), for any rank and without a process group."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, offset = _compute_local_shape_and_global_offset(
        tuple(global_shape), tuple(mesh_shape), list(coordinate), list(placements))
    return tuple(int(s) for s in shape), tuple(int(o) for o in offset)


def local_box(t) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) in the global tensor of this rank's piece of DTensor t, as DTensor reports
    it (torch.distributed.tensor._utils.compute_local_shape_and_global_offset). The tests check
    loads against it: it does not share dist_saver's layout code."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offset), tuple(int(s) for s in shape)


def default_store():
    """The store init_process_group made (torchrun's rendezvous store), or None without one
    (torch.distributed.distributed_c10d._get_default_store)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or the private API is gone: callers do without
        return None


def new_gloo_group(ranks: Sequence[int], name: str, timeout_s: float, store):
    """A gloo process group of these global ranks whose keys in `store` (the default group's,
    default_store()) all live under `name` (torch.distributed.distributed_c10d.
    _new_process_group_helper, then the global -> group rank map that torch's own
    _new_group_with_tag records, _world.pg_group_ranks).

    dist.new_group names a group after its ranks and the number of groups made so far, which
    repeat from one torchrun attempt to the next, while torchrun's store outlives the attempt:
    the new group would read the dead peers' addresses. The name given here is unique to the
    attempt. Called by the group's members only (no NCCL split of the default group)."""
    import datetime

    from torch.distributed import distributed_c10d as c10d

    ranks = list(ranks)
    pg, _ = c10d._new_process_group_helper(
        len(ranks), ranks.index(dist.get_rank()), ranks, "gloo", store, name,
        timeout=datetime.timedelta(seconds=timeout_s), group_desc="dist_saver")
    c10d._world.pg_group_ranks[pg] = {g: i for i, g in enumerate(ranks)}
    return pg


def collective_device(group):
    """The device torch's object collectives use on `group` (cuda for an NCCL group, cpu for gloo)
    (torch.distributed.distributed_c10d._get_object_coll_device); the current CUDA device for cuda."""
    import torch

    kind = dist.distributed_c10d._get_object_coll_device(group)
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)
