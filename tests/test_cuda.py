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
