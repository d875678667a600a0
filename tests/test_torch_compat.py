"""The private torch APIs behind dist_saver/torch_compat.py still behave as dist_saver assumes.

A failure here after a torch upgrade names the torch API that changed: adapt torch_compat.py.
"""

import inspect
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from dist_saver import torch_compat

from .dist_utils import run_ranks

STRIDED = "torch.distributed.tensor.placement_types._StridedShard"
LOCAL = "torch.distributed.tensor._utils._compute_local_shape_and_global_offset"
BOX = "torch.distributed.tensor._utils.compute_local_shape_and_global_offset"
STORE = "torch.distributed.distributed_c10d._get_default_store"
GROUP = "torch.distributed.distributed_c10d._new_process_group_helper (+ _world.pg_group_ranks)"
DEVICE = "torch.distributed.distributed_c10d._get_object_coll_device"


def test_strided_shard_type():
    cls = torch_compat.strided_shard_type()
    assert cls is not None, f"{STRIDED} is gone: FSDP2-over-TP DTensors would be refused"
    p = cls(0, split_factor=2)
    assert (p.dim, p.split_factor) == (0, 2), f"{STRIDED}(0, split_factor=2) changed: {p!r}"
    # layouts are hashed (lru_cache) and travel pickled in the gathered metadata
    assert pickle.loads(pickle.dumps(p)) == p, f"{STRIDED} no longer survives pickling"
    assert hash(p) == hash(cls(0, split_factor=2)), f"{STRIDED} is no longer hashable by value"


def _cases():
    strided = torch_compat.strided_shard_type()
    # (global shape, mesh shape, mesh coordinate, placements, (local shape, global offset))
    yield (70, 10), (4,), (3,), (Shard(0),), ((16, 10), (54, 0))  # uneven: torch.chunk's 18, 18, 18, 16
    yield (4, 100), (2,), (1,), (Shard(1),), ((4, 50), (0, 50))
    yield (100, 8), (2, 2), (1, 1), (Shard(0), Shard(1)), ((50, 4), (50, 4))
    yield (64, 16), (2, 2), (1, 0), (Replicate(), Shard(0)), ((32, 16), (0, 0))
    yield (), (2,), (1,), (Replicate(),), ((), ())
    if strided is not None:  # TP halves first, then FSDP splits each half: mesh (1, 0) holds rows 25-49
        yield (100, 8), (2, 2), (1, 0), (strided(0, split_factor=2), Shard(0)), ((25, 8), (25, 0))
        yield (100, 8), (2, 2), (0, 1), (strided(0, split_factor=2), Shard(0)), ((25, 8), (50, 0))


@pytest.mark.parametrize("shape, mesh, coord, placements, want", list(_cases()))
def test_local_shape_and_offset(shape, mesh, coord, placements, want):
    got = torch_compat.local_shape_and_offset(shape, mesh, coord, placements)
    assert got == want, f"{LOCAL}{(shape, mesh, list(coord), list(placements))} gave {got}, expected {want}"


def test_local_shape_and_offset_of_an_empty_shard():
    # 2 rows over 4 ranks: the last ranks hold nothing (their offset is not used)
    got, _ = torch_compat.local_shape_and_offset((2, 3), (4,), (3,), (Shard(0),))
    assert got == (0, 3), f"{LOCAL} gives an empty shard the shape {got}, expected (0, 3)"


def test_default_store_api():
    fn = getattr(dist.distributed_c10d, "_get_default_store", None)
    assert fn is not None, f"{STORE} is gone: dead ranks can no longer be named after a failed save"
    params = list(inspect.signature(fn).parameters)
    assert not params, f"{STORE} now takes parameters {params}"
    if not dist.is_initialized():
        assert torch_compat.default_store() is None, f"{STORE} without a process group must give None"


def _in_group(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    t = distribute_tensor(torch.arange(15.0).reshape(5, 3), init_device_mesh("cpu", (world,)), [Shard(0)])
    store = torch_compat.default_store()
    # a gloo group whose store keys live under a name of ours: a registered group collectives accept
    group = torch_compat.new_gloo_group([0, 1], "dist_saver/test/group", 10.0, store)
    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value, group=group)
    made = (dist.get_process_group_ranks(group), dist.get_rank(group), group.group_name, value.item(),
            str(torch_compat.collective_device(group)), str(torch_compat.collective_device(None)))
    shared = None
    if isinstance(store, dist.Store):  # the same store on every rank: one rank's key is seen by the other
        store.set(f"torch_compat/{rank}", str(rank))
        store.wait([f"torch_compat/{1 - rank}"])
        shared = store.get(f"torch_compat/{1 - rank}").decode()
    return torch_compat.local_box(t), type(store).__name__, shared, made


def test_local_box_default_store_and_groups_in_a_process_group():
    outs = run_ranks(_in_group, 2)
    for rank, out in enumerate(outs):
        assert out[3] == ([0, 1], rank, "dist_saver/test/group", 3.0, "cpu", "cpu"), \
            f"{GROUP} / {DEVICE} changed: group ranks, rank, name, all_reduce, devices {out[3]}"
    boxes = [o[0] for o in outs]
    assert boxes == [((0, 0), (3, 3)), ((3, 0), (2, 3))], f"{BOX} gave the boxes {boxes} for 5 rows over 2 ranks"
    for rank, (_, kind, shared, _) in enumerate(outs):
        assert shared == str(1 - rank), f"{STORE} gave a {kind}, not the process group's shared store"
