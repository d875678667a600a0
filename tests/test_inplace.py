"""In-place sharded writes: every rank writes the bytes it holds into the owner's files.

Real process groups (gloo, CPU). Every checkpoint is compared byte for byte with the files the plan
describes (header + each tensor's bytes in plan order), loaded back bit for bit, and verified.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist

from dist_saver import CheckpointError, DistSaverError, SaveError, dist_load, dist_save, load_state_dict, verify
from dist_saver import format as fmt
from dist_saver.commit import check_written
from dist_saver.layout import is_dtensor
from dist_saver.plan import TensorInfo, make_plan
from dist_saver.torch_compat import local_box
from dist_saver.writer import WrittenRange

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, check_checkpoint_files
from .sharded_models import box_slice, build, build_on, local_bytes, reference_state_dict


def odd_reference(seed: int = 0) -> dict[str, torch.Tensor]:
    """Uneven shapes at any world size: 7 and 3 rows, 9 columns, an empty and a 0-d tensor."""
    g = torch.Generator().manual_seed(seed)
    return {"rows": torch.randn(7, 5, generator=g), "cols": torch.randn(5, 9, generator=g).bfloat16(),
            "tiny": torch.arange(3, dtype=torch.int64), "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(2.5), "plain": torch.randn(11, 3, generator=g).double(),
            # odd byte counts before wider dtypes in one exchange round: pieces must stay aligned
            "cols8": torch.randint(-100, 100, (3, 7), generator=g, dtype=torch.int8),
            "colsbool": torch.randint(0, 2, (5, 3), generator=g).bool(),
            "cols64": torch.randint(0, 1 << 40, (3, 5), generator=g)}


def _odd_state(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = {"rows": [Shard(0)], "cols": [Shard(1)], "tiny": [Shard(0)], "empty": [Shard(0)],
                  "scalar": [Replicate()], "cols8": [Shard(1)], "colsbool": [Shard(1)], "cols64": [Shard(1)]}
    return {k: distribute_tensor(t, mesh, placements[k]) if k in placements else t
            for k, t in odd_reference().items()}


def _save_layouts(rank, world, root, layouts, small):
    import dist_saver.plan as plan_mod

    if small == "in place":  # these models' tensors are all small: written in place anyway
        plan_mod.SMALL_SHARDED_BYTES = 0
    out = {}
    for layout in layouts:
        model = _odd_state(world) if layout == "odd" else build(layout, world)
        mine = local_bytes(model) if layout in ("fsdp", "hsdp") else None
        for direct in (False, True):
            path = os.path.join(root, f"{layout}-{'direct' if direct else 'buffered'}")
            # a small bucket on one of the two: many rounds, chunks cut inside row bands
            res = dist_save(model, path, direct_io=direct, **({"bucket_size": 4096} if direct else {}))
            held = [None] * world
            dist.all_gather_object(held, mine)
            if rank == 0:
                out[path] = (layout, res.plan, res.bytes_sent, held, res.files)
    return out


def _expected_bytes(plan, reference, checkpoint_id) -> dict[str, bytes]:
    """What the plan says each file holds: its header (with the save's id), then every tensor's
    bytes in plan order."""
    out = {}
    for f in plan.files:
        parts = [f.header_for(checkpoint_id)]
        for t in f.tensors:
            v = reference[t.name]
            parts.append(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        out[f.name] = b"".join(parts)
    return out


def _check_bytes(path, layout, plan) -> dict:
    """The checkpoint loads bit for bit, holds exactly the plan's bytes and verifies; its index."""
    reference = odd_reference() if layout == "odd" else reference_state_dict()
    check_checkpoint_files(path)
    assert_bitwise_equal(load_state_dict(path), reference)
    with open(os.path.join(path, fmt.INDEX_NAME)) as fh:
        index = json.load(fh)
    checkpoint_id = index["metadata"]["dist_saver"][fmt.CHECKPOINT_ID_KEY]
    for name, data in _expected_bytes(plan, reference, checkpoint_id).items():
        with open(os.path.join(path, name), "rb") as f:
            assert f.read() == data, f"{path}/{name} differs from the plan's bytes"
    assert verify(path)
    return index


def _check_small_assembled(saves):
    """Small sharded tensors (all of these models') assembled whole on their owners: the same
    bytes, one range per run of them in a file, written by the file's owner."""
    for path, (layout, plan, sent, held, files) in saves.items():
        index = _check_bytes(path, layout, plan)
        recorded = index["metadata"]["dist_saver"]["files"]
        if layout == "fsdp":  # nothing replicated: each file is its header and one run by its owner
            assert sum(sent) > 0, (path, sent)
            for f in files:
                assert {r for _, _, r, _ in recorded[f.name]["ranges"]} == {f.rank}, (path, f.name)
                assert len(recorded[f.name]["ranges"]) <= 2, (path, recorded[f.name]["ranges"])


def _check_saves(saves):
    for path, (layout, plan, sent, held, files) in saves.items():
        index = _check_bytes(path, layout, plan)
        if layout in ("fsdp", "hsdp"):  # pure Shard(0): nothing crosses the network
            assert sum(sent) == 0, (path, sent)
            if layout == "fsdp":
                assert plan.bytes_per_rank() == held, "each rank writes exactly what it holds"
            else:  # replicas share the writing of the rows they all hold
                assert all(w < h for w, h in zip(plan.bytes_per_rank(), held))
        else:  # column shards cross once at most: never more than the Shard(1) tensors' bytes
            assert 0 < sum(sent) < plan.total_size / 2, (path, sent)
        if layout in ("fsdp", "tp", "2d"):
            assert any(len(f.writers) > 1 for f in files), "files are written by several ranks"
        for f in files:  # the index records what was written, range by range
            recorded = index["metadata"]["dist_saver"]["files"][f.name]["ranges"]
            assert [(b, n, r) for b, n, r, _ in recorded] == [(w.begin, w.end - w.begin, w.rank) for w in f.ranges]
            assert all(c.startswith(("xxh3_64@1048576:", "crc32@1048576:")) for *_, c in recorded)


@pytest.mark.parametrize("world, layouts", [
    (2, ("fsdp", "tp", "hsdp", "odd")),
    (4, ("fsdp", "tp", "2d", "hsdp", "odd")),
])
@pytest.mark.parametrize("small", ["in place", "assembled"])
def test_sharded_saves_write_in_place_bit_exact(tmp_path, world, layouts, small):
    saves = run_ranks(_save_layouts, world, str(tmp_path), layouts, small, timeout=300)[0]
    assert len(saves) == 2 * len(layouts)
    (_check_saves if small == "in place" else _check_small_assembled)(saves)


def _flip_and_load(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dist_saver.plan as plan_mod

    plan_mod.SMALL_SHARDED_BYTES = 0  # the bands of these 256 KB weights in place: rank 1's ranges

    def model():
        mesh = init_device_mesh("cpu", (world,))
        m = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(4)])
        for layer in m:
            fully_shard(layer, mesh=mesh)
        return m

    torch.manual_seed(0)
    dist_save(model(), path)
    victim = None
    if rank == 0:  # damage one byte in the middle of a range rank 1 wrote into rank 0's file
        with open(os.path.join(path, fmt.INDEX_NAME)) as f:
            files = json.load(f)["metadata"]["dist_saver"]["files"]
        name = next(n for n, e in sorted(files.items()) if e["rank"] == 0)
        begin, length, writer, _ = next(r for r in files[name]["ranges"] if r[2] == 1)
        victim = (name, begin, begin + length)
        with open(os.path.join(path, name), "r+b") as f:
            f.seek(begin + length // 2)
            byte = f.read(1)
            f.seek(begin + length // 2)
            f.write(bytes([byte[0] ^ 0x10]))
    dist.barrier()
    alone = [dist.new_group([r]) for r in range(world)]  # each rank's load stands on its own
    target = model()
    try:
        res = dist_load(target, path, verify=True, process_group=alone[rank])
        outcome = ("ok", res.bytes_read, res.bytes_verified)
    except CheckpointError as e:
        outcome = ("error", str(e))
    return victim, outcome, local_bytes(target)


def test_verify_names_the_range_and_rank_and_partial_loads_check_only_their_ranges(tmp_path):
    path = str(tmp_path / "ck")
    outs = run_ranks(_flip_and_load, 2, path)
    (name, begin, end), ok0, share0 = outs[0]
    _, err1, _ = outs[1]
    # rank 0's shard lies in ranges rank 0 wrote: it loads, having checked only those (and headers)
    assert ok0[0] == "ok" and ok0[1] == share0
    assert share0 <= ok0[2] <= share0 + 2 * 4096
    # rank 1 needs the damaged range: its load names the file, the bytes and who wrote them
    assert err1[0] == "error" and name in err1[1] and f"[{begin}, {end})" in err1[1] and "rank 1" in err1[1]
    with pytest.raises(CheckpointError, match=rf"{name}: checksum .* of bytes \[{begin}, {end}\) \(written by rank 1\)"):
        verify(path)


def test_commit_refuses_missing_duplicate_and_misattributed_ranges():
    infos = [TensorInfo("a", "F32", (8, 4), 128), TensorInfo("b", "F32", (8, 4), 128)]
    boxes = {"a": ({0: ((0, 0), (4, 4)), 1: ((4, 0), (4, 4))},)}
    plan = make_plan(infos, 2, boxes=boxes)
    good = []
    for f in plan.files:
        good.append(WrittenRange(f.name, 0, f.data_start, f.rank))
        good += [WrittenRange(f.name, f.data_start + e.begin, f.data_start + e.end, e.rank) for e in f.extents]
    assert len(good) > len(plan.files) + 1  # 'a' is written by both ranks
    check_written(plan, good)
    with pytest.raises(SaveError, match=r"bytes \[\d+, \d+\) \(rank \d\) were not written"):
        check_written(plan, good[:-1])
    with pytest.raises(SaveError, match="reported by ranks"):
        check_written(plan, good + good[-1:])
    wrong = good[:-1] + [WrittenRange(good[-1].file, good[-1].begin, good[-1].end, 1 - good[-1].rank)]
    with pytest.raises(SaveError, match="planned for rank"):
        check_written(plan, wrong)


def _on_device(rank, world, root, device):
    """Save sharded models whose pieces live on `device` (sync and async), load them back there."""
    import dist_saver.plan as plan_mod

    plan_mod.SMALL_SHARDED_BYTES = 0  # the bands in place, as a larger model's (these are all small)
    if device == "cuda":
        torch.cuda.set_device(0)  # one GPU shared by the ranks (gloo moves the bytes)
    reference = reference_state_dict()
    out = {}
    for layout in ("fsdp", "tp"):
        model = build_on(layout, world, device)
        for async_save in (False, True):
            path = os.path.join(root, f"{layout}-{device}-{'async' if async_save else 'sync'}")
            res = dist_save(model, path, async_save=async_save)
            res = res.wait() if async_save else res
            out[path] = sum(res.bytes_sent)
        target = build_on(layout, world, device, seed=5)
        dist_load(target, path)
        for name, p in target.state_dict().items():
            local = p.to_local() if is_dtensor(p) else p
            assert local.device.type == device, name
            want = reference[name][box_slice(local_box(p))] if is_dtensor(p) else reference[name]
            assert torch.equal(local.cpu(), want), name
    return out


def _check_device_saves(outs):
    for path, sent in outs[0].items():
        assert_bitwise_equal(load_state_dict(path), reference_state_dict())
        assert verify(path)
        assert (sent == 0) == ("fsdp" in os.path.basename(path)), (path, sent)


def test_sharded_pieces_materialised_from_meta_save_and_load_on_cpu(tmp_path):
    _check_device_saves(run_ranks(_on_device, 2, str(tmp_path), "cpu", timeout=180))


@pytest.mark.cuda
def test_sharded_cuda_dtensors_of_two_ranks_sharing_one_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    _check_device_saves(run_ranks(_on_device, 2, str(tmp_path), "cuda", timeout=180))


def _failing_pack(rank, world, path):
    import time

    import dist_saver.exchange as exchange

    real = exchange.local_slice

    def failing(*args):
        if rank == 1:
            raise RuntimeError("injected: cannot read this piece")
        return real(*args)

    exchange.local_slice = failing  # rank 1 cannot pack what it sends: the others must not hang
    model = build("tp", world)
    t0 = time.monotonic()
    try:
        dist_save(model, path, timeout=60)
    except DistSaverError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


def test_an_error_packing_the_exchange_fails_every_rank_at_once(tmp_path):
    outs = run_ranks(_failing_pack, 2, str(tmp_path / "ck"), timeout=120)
    for message, seconds in outs:
        assert message and "rank 1: RuntimeError: injected: cannot read this piece" in message, message
        assert seconds < 30, f"took {seconds:.0f}s: a rank waited for the timeout"
    assert not (tmp_path / "ck").exists()


def test_a_failing_range_gives_its_buffer_back_to_the_pool(tmp_path):
    from dist_saver.writer import Streamer

    path = str(tmp_path / "f")
    with Streamer(buffer_bytes=4096, count=2) as s:
        s.create(path, b"h" * 10, 10 + 3 * 4096)
        for _ in range(3):  # more failures than buffers: a leak would block the next take()
            stream = s.open_range(path, 10, 10 + 3 * 4096)
            with pytest.raises(RuntimeError, match="mid-range"):
                with stream.returning_buffers():
                    stream.put(torch.ones(100, dtype=torch.uint8))
                    raise RuntimeError("mid-range")
        stream = s.open_range(path, 10, 10 + 3 * 4096)
        stream.put(torch.full((3 * 4096,), 7, dtype=torch.uint8))
        stream.close()
        s.finish()
    assert open(path, "rb").read()[10:] == b"\x07" * (3 * 4096)
