"""CUDA tensors save and load bit for bit (skipped without a GPU; run by scripts/gpu_check.sh)."""

import pytest
import torch

from dist_saver import dist_load, dist_save, load_state_dict

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, check_checkpoint_files, mixed_state_dict

pytestmark = pytest.mark.cuda


def test_cuda_roundtrip_single_process(tmp_path):
    cpu = mixed_state_dict(seed=4)
    sd = {k: v.cuda() for k, v in cpu.items() if k != "lm_head.weight"}
    sd["lm_head.weight"] = sd["embed.weight"]
    sd["noncontig.cuda"] = torch.randn(64, 48, device="cuda").t()
    cpu["noncontig.cuda"] = sd["noncontig.cuda"].cpu()
    dist_save(sd, tmp_path / "ck", max_shard_size="4KB")
    check_checkpoint_files(tmp_path / "ck")
    assert_bitwise_equal(load_state_dict(tmp_path / "ck"), cpu)
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    target["lm_head.weight"] = target["embed.weight"]
    dist_load(target, tmp_path / "ck")
    assert all(t.is_cuda for t in target.values())
    assert_bitwise_equal(target, cpu)


def _cuda_ranks(rank, world, path):
    torch.cuda.set_device(0)  # one GPU shared by the ranks
    sd = {f"w{i}": torch.full((256, 33), float(i), device="cuda")[:, :32] for i in range(8)}
    dist_save(sd, path)
    target = {k: torch.zeros(256, 32, device="cuda") for k in sd}
    dist_load(target, path)
    return all(torch.equal(target[k], sd[k]) for k in sd)


def test_cuda_tensors_from_two_ranks(tmp_path):
    assert run_ranks(_cuda_ranks, 2, str(tmp_path / "ck")) == [True, True]


def test_cuda_load_through_the_pinned_double_buffer(tmp_path):
    """Tensors several staging blocks long, a non-contiguous CUDA target and a column box all go
    through the two pinned buffers with the copies on a side stream: the values must be exact and
    in place when dist_load returns, and later work on the caller's stream must see them."""
    from dist_saver.buffers import staging_buffer
    from dist_saver.reader import ShardFile

    gen = torch.Generator().manual_seed(0)
    cpu = {"big": torch.randn(3000, 4096, generator=gen),  # 47 MiB: two blocks of 32 MiB
           "wide": torch.randn(512, 8192, generator=gen).to(torch.bfloat16),
           "odd": torch.randn(1001, 333, generator=gen)}
    dist_save(cpu, tmp_path / "ck")
    targets = {"big": torch.full((4096, 3000), 7.0, device="cuda").t(),  # non-contiguous
               "wide": torch.zeros(512, 8192, dtype=torch.bfloat16, device="cuda"),
               "odd": torch.zeros(1001, 333, device="cuda")}
    assert not targets["big"].is_contiguous()
    dist_load(targets, tmp_path / "ck")
    sums = {k: v.double().sum() for k, v in targets.items()}  # queued on the caller's stream at once
    assert_bitwise_equal({k: v.cpu() for k, v in targets.items()}, cpu)
    assert all(float(sums[k]) == float(cpu[k].double().sum()) for k in cpu)
    # a column box of narrow rows (whole rows read, columns picked on the device), straight
    staging = staging_buffer()
    out = torch.zeros(3000, 100, device="cuda")
    (file,) = (tmp_path / "ck").glob("*.safetensors")
    with ShardFile(str(file)) as f:
        f.read_into("big", out, ((0, 1000), (3000, 100)), staging)
        staging.finish()
    assert torch.equal(out.cpu(), cpu["big"][:, 1000:1100])
    assert staging._pinned


def _tp_cuda(rank, world, path):
    from dist_saver.layout import is_dtensor
    from dist_saver.torch_compat import local_box
    from tests.sharded_models import box_slice, build_on, reference_state_dict

    torch.cuda.set_device(0)
    target = build_on("tp", world, "cuda", seed=9)
    res = dist_load(target, path)
    reference = reference_state_dict()
    for name, p in target.state_dict().items():
        local = p.to_local() if is_dtensor(p) else p
        want = reference[name][box_slice(local_box(p))] if is_dtensor(p) else reference[name]
        assert local.is_cuda and torch.equal(local.cpu(), want), name
    return res.bytes_read


def test_cuda_rowwise_tp_load_through_the_exchange(tmp_path):
    from tests.sharded_models import reference_state_dict

    path = str(tmp_path / "ck")
    dist_save(reference_state_dict(), path)
    read = run_ranks(_tp_cuda, 2, path)
    assert all(n > 0 for n in read)
