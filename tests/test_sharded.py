"""FSDP2, tensor parallel and 2-D models: save as full tensors, load into any layout."""

import os
import re

import pytest
import torch
import torch.distributed as dist

from dist_saver import DistSaverError, dist_load, dist_save, load_state_dict
from dist_saver.layout import is_dtensor
from dist_saver.format import nbytes
from dist_saver.memory import PeakRSS

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, check_checkpoint_files
from .sharded_models import build, full_state_dict, local_bytes, reference_state_dict


def _save(rank, world, layout, path, bucket_size):
    model = build(layout, world)
    res = dist_save(model, path, bucket_size=bucket_size)
    return {f.name: f.rank for f in res.files}


def _load(rank, world, layout, path, verify=False):
    from dist_saver.reader import ShardFile

    requests = []  # (file, offset, length) of every read this rank asks of the files
    preadv = ShardFile._preadv

    def traced(self, views, offset):
        if offset >= self.data_start:  # the tensors' bytes (headers are read on opening)
            requests.append((os.path.basename(self.path), offset, sum(len(v) for v in views)))
        return preadv(self, views, offset)

    ShardFile._preadv = traced
    model = build(layout, world, seed=123)  # different values everywhere before loading
    res = dist_load(model, path, verify=verify)
    got = full_state_dict(model)
    assert_bitwise_equal(got, reference_state_dict())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    needs = {}  # name -> (bytes of this rank's piece, whether it is split by columns)
    for name, v in model.state_dict().items():
        local = v.to_local() if is_dtensor(v) else v
        needs[name] = (nbytes(local.shape, local.dtype), tuple(local.shape[1:]) != tuple(v.shape[1:]))
    return {"bytes_read": res.bytes_read, "local_bytes": local_bytes(model), "tied": tied,
            "files": sorted(res.files_opened), "requests": requests, "needs": needs}


def _check_read_once(path, outs):
    """Every stored tensor is read whole by the group, never more than its ranks need, and a
    column-split one exactly once (the load exchange hands the pieces round)."""
    from dist_saver.format import read_header

    spans = {}  # name -> (file, begin, end) of its bytes
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            header, start = read_header(os.path.join(path, name))
            for t, e in header.items():
                if t != "__metadata__":
                    spans[t] = (name, start + e["data_offsets"][0], start + e["data_offsets"][1])
    for t, (file, lo, hi) in spans.items():
        pieces = sorted((max(lo, o), min(hi, o + n)) for out in outs for f, o, n in out["requests"]
                        if f == file and o < hi and o + n > lo)
        read = sum(b - a for a, b in pieces)
        covered, pos = 0, lo
        for a, b in pieces:
            covered += max(0, b - max(a, pos))
            pos = max(pos, b)
        needed = sum(out["needs"][t][0] for out in outs)
        assert covered == hi - lo, f"{t}: the group read {covered} of its {hi - lo} bytes"
        assert read <= needed, f"{t}: the group read {read} bytes for {needed} bytes of pieces"
        if any(out["needs"][t][1] for out in outs):
            assert read == hi - lo, f"{t} (split by columns): the group read {read} bytes, not its {hi - lo} once"


PAIRS = [
    (("fsdp", 4), ("tp", 2)),
    (("tp", 2), ("fsdp", 4)),
    (("2d", 4), ("none", 1)),
    (("none", 1), ("fsdp", 2)),
    (("fsdp", 3), ("2d", 4)),
    (("2d", 4), ("tp", 4)),
]


@pytest.mark.parametrize("src, dst", PAIRS, ids=[f"{a[0]}{a[1]}-to-{b[0]}{b[1]}" for a, b in PAIRS])
def test_save_in_one_layout_load_in_another(tmp_path, src, dst):
    path = str(tmp_path / "ck")
    # a small bucket forces many exchange rounds and chunks split inside tensors
    files = run_ranks(_save, src[1], src[0], path, 4096)[0]
    check_checkpoint_files(path)
    assert len(set(files.values())) == min(src[1], len(files)), "every rank wrote its own files"
    # same bytes as the unsharded model, tied embedding stored once
    assert_bitwise_equal(load_state_dict(path), reference_state_dict())
    outs = run_ranks(_load, dst[1], dst[0], path)
    total = sum(nbytes(t.shape, t.dtype) for t in load_state_dict(path).values()
                if t.data_ptr() != 0) - 50 * 100 * 4  # tied lm_head counted once
    for out in outs:
        assert out["tied"]
        if dst[0] in ("fsdp", "none"):  # row shards: exactly the bytes of its own pieces
            assert out["bytes_read"] == out["local_bytes"]
        if dst[0] == "fsdp":
            assert out["bytes_read"] < 0.6 * total
    _check_read_once(path, outs)
    if dst[0] in ("tp", "2d"):  # the group's reads: what it needs, column pieces once
        assert sum(out["bytes_read"] for out in outs) <= sum(out["local_bytes"] for out in outs)


def _cold_read(rank, world, path):
    import dist_saver.load  # noqa: F401  (import before measuring)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(2)])
    for m in model:
        fully_shard(m, mesh=mesh)
    alone = [dist.new_group([r]) for r in range(world)]  # so the loads can run one at a time
    measured = None
    for turn in range(world):  # one rank at a time, each from a cold page cache
        if rank == turn:
            for f in os.listdir(path):
                fd = os.open(os.path.join(path, f), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            before = _read_bytes()
            res = dist_load(model, path, process_group=alone[rank])
            measured = _read_bytes() - before, res.bytes_read
        dist.barrier()
    return measured


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def test_cold_load_reads_about_its_shard_from_disk(tmp_path):
    path = str(tmp_path / "ck")
    torch.manual_seed(0)
    # few large tensors: kernel readahead (up to a few MiB per read stream) stays small beside them
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(2)])
    dist_save(model, path)  # 128 MiB in one file
    total = 2 * 4096 * 4096 * 4
    outs = run_ranks(_cold_read, 4, path)
    for disk, counted in outs:
        # the shard, and for the checksums the rest of the 1 MiB blocks its edges fall in (the
        # tensors start 4 KiB into the file, after the header, so no shard edge is a block edge)
        assert total // 4 < counted <= total // 4 + 2 * 2 * (1 << 20)
        # what the disk delivered is what was read (plus the header's pages), not whole tensors
        assert disk <= 1.05 * counted + (1 << 20), f"read {disk} bytes from disk for a {counted}-byte shard"


def _memory(rank, world, path, bucket, layout):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(8)])
    if layout == "fsdp":
        for m in model:
            fully_shard(m, mesh=mesh)
    else:  # rowwise TP: every weight is split by columns, so every byte goes through the exchange
        parallelize_module(model, mesh, {str(i): RowwiseParallel() for i in range(8)})
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_()
    share = local_bytes(model)
    dist_save(model, path + "_warmup", bucket_size=bucket)  # first use of gloo/threads settles RSS
    with PeakRSS() as mem:
        res = dist_save(model, path, bucket_size=bucket)
    return share, mem.extra, res.bytes_sent[rank]


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_save_memory_stays_within_the_bucket_budget(tmp_path, layout):
    bucket = 4 << 20
    outs = run_ranks(_memory, 2, str(tmp_path / "ck"), bucket, layout)
    for share, extra, sent in outs:
        assert share == 64 << 20
        # FSDP: written in place, nothing sent; TP: half of each band crosses (the exchange's send
        # and receive buffers, about a bucket each); never the 64 MiB share
        assert sent == (0 if layout == "fsdp" else 32 << 20)
        assert extra <= 2 * bucket + (8 << 20), f"extra {extra / 2**20:.1f} MiB over a {bucket >> 20} MiB bucket"
    back = load_state_dict(str(tmp_path / "ck"))
    assert len(back) == 8


def _partial(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    sd = {"ok": torch.ones(3), "grad_sum": DTensor.from_local(torch.ones(4), mesh, [Partial()])}
    try:
        dist_save(sd, path)
    except DistSaverError as e:
        return str(e)


def test_partial_placement_is_refused_on_every_rank(tmp_path):
    outs = run_ranks(_partial, 2, str(tmp_path / "ck"))
    for out in outs:
        assert out and re.search(r"rank 0,1: ValueError: tensor 'grad_sum' has placements \[Partial", out), out
    assert not (tmp_path / "ck" / "model.safetensors.index.json").exists()


def _subgroup(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from dist_saver.synthetic import llama_tp_plan

    from .sharded_models import DIMS, TinyLlama

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = TinyLlama(**DIMS)  # tensor parallel inside each data-parallel replica
    parallelize_module(model, mesh["tp"], llama_tp_plan(DIMS["layers"]))
    replica = mesh.get_coordinate()[0]
    res = dist_save(model, os.path.join(root, f"replica{replica}"), process_group=mesh["tp"].get_group())
    return res.world_size, sorted({f.rank for f in res.files})


def test_save_over_a_subgroup_of_the_world(tmp_path):
    outs = run_ranks(_subgroup, 4, str(tmp_path))
    assert all(o == (2, [0, 1]) for o in outs)
    for replica in (0, 1):
        path = tmp_path / f"replica{replica}"
        check_checkpoint_files(path)
        assert_bitwise_equal(load_state_dict(path), reference_state_dict())
