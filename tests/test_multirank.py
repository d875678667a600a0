"""Real process groups (gloo on CPU): save from N ranks, check the files, load back bit for bit."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from dist_saver import CheckpointError, PlanError, SaveError, dist_load, dist_save, load_state_dict
from dist_saver import format as fmt
from dist_saver.synthetic import TinyLlama

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, check_checkpoint_files, mixed_state_dict


def _roundtrip(rank, world, path):
    sd = mixed_state_dict(seed=11)  # the same on every rank: replicated, as under DDP
    res = dist_save(sd, path, max_shard_size=1500)
    model = TinyLlama(layers=8, seed=5)
    res_llama = dist_save(model, os.path.join(path, "llama"))
    dist.barrier()
    target = {k: torch.zeros_like(v) for k, v in sd.items() if k != "lm_head.weight"}
    target["lm_head.weight"] = target["embed.weight"]
    dist_load(target, path)
    assert_bitwise_equal(target, sd)
    other = TinyLlama(layers=8, seed=99)
    dist_load(other, os.path.join(path, "llama"))
    assert_bitwise_equal(other.state_dict(), model.state_dict())
    assert other.lm_head.weight is other.model.embed_tokens.weight
    return {
        "mine": [f.name for f in res.my_files],
        "all": sorted(f.name for f in res.files),
        "llama_bytes": res_llama.plan.bytes_per_rank(),
        "llama_sizes": [e.end - e.begin for f in res_llama.plan.files for e in f.tensors],
    }


@pytest.mark.parametrize("world", [1, 2, 4])
def test_roundtrip_every_dtype_and_balance(tmp_path, world):
    path = str(tmp_path / "ck")
    outs = run_ranks(_roundtrip, world, path)
    assert all(o["all"] == outs[0]["all"] for o in outs), "every rank returns the same result"
    mine = [n for o in outs for n in o["mine"]]
    assert sorted(mine) == outs[0]["all"], "each file written by exactly one rank"
    if world > 1:
        assert all(o["mine"] for o in outs), "every rank wrote a share"
    index = check_checkpoint_files(path)
    ranks = {f: v["rank"] for f, v in index["metadata"]["dist_saver"]["files"].items()}
    for o_rank, o in enumerate(outs):
        assert all(ranks[f] == o_rank for f in o["mine"])
    assert_bitwise_equal(load_state_dict(path), mixed_state_dict(seed=11))
    # balance by bytes for a Llama-shaped state dict: busiest <= ideal + largest
    per_rank, sizes = outs[0]["llama_bytes"], outs[0]["llama_sizes"]
    assert max(per_rank) <= sum(per_rank) / world + max(sizes)
    check_checkpoint_files(os.path.join(path, "llama"))


def _subset_load(rank, world, path):
    model = TinyLlama(layers=6, seed=3, tie_embeddings=False)
    dist_save(model, path, max_shard_size=20_000)
    dist.barrier()
    # rank r needs only its half of the layers (as a pipeline stage would)
    full = model.state_dict()
    lo, hi = (0, 3) if rank == 0 else (3, 6)
    wanted = [k for k in full if any(k.startswith(f"model.layers.{i}.") for i in range(lo, hi))]
    target = {k: torch.zeros_like(full[k]) for k in wanted}
    import dist_saver.index as load_mod

    opened = []
    real_open = load_mod.open_weights

    def spy(path, *a, **kw):
        opened.append(os.path.basename(path))
        return real_open(path, *a, **kw)

    load_mod.open_weights = spy
    try:
        res = dist_load(target, path, strict=False)
    finally:
        load_mod.open_weights = real_open
    assert_bitwise_equal(target, {k: full[k] for k in wanted})
    return wanted, sorted(set(opened)), sorted(res.files_opened)  # (headers are checked, then read)


def test_rank_opens_only_the_files_holding_its_tensors(tmp_path):
    path = str(tmp_path / "ck")
    outs = run_ranks(_subset_load, 2, path)
    with open(os.path.join(path, fmt.INDEX_NAME)) as f:
        weight_map = json.load(f)["weight_map"]
    n_files = len(set(weight_map.values()))
    for wanted, opened, reported in outs:
        expected = sorted({weight_map[k] for k in wanted})
        assert opened == expected == reported
        assert len(expected) < n_files


def _pipeline(rank, world, path):
    # each rank holds a different part of the model, plus one shared tensor
    sd = {"shared": torch.arange(10, dtype=torch.float32)}
    for i in range(3):
        sd[f"stage{rank}.w{i}"] = torch.full((50,), float(rank * 10 + i))
    res = dist_save(sd, path)
    return {f.name: f.tensors for f in res.files}


def test_tensors_held_by_some_ranks_are_written_by_a_holder(tmp_path):
    path = str(tmp_path / "ck")
    outs = run_ranks(_pipeline, 2, path)
    assert outs[0] == outs[1], "every rank reports the same files"
    back = load_state_dict(path)
    assert torch.equal(back["stage1.w2"], torch.full((50,), 12.0))
    assert len(back) == 7
    index = check_checkpoint_files(path)
    files = index["metadata"]["dist_saver"]["files"]
    for name, file in index["weight_map"].items():
        if name.startswith("stage"):
            assert files[file]["rank"] == int(name[5])


def _bad_input(rank, world, path, case):
    sd = {"w": torch.ones(4, 4), "b": torch.zeros(4)}
    if case == "non_tensor" and rank == 1:
        sd["step"] = 100
    if case == "shape" and rank == 1:
        sd["w"] = torch.ones(4, 5)
    if case == "dtype" and rank == 0:
        sd["b"] = torch.zeros(4, dtype=torch.float16)
    try:
        dist_save(sd, path)
    except (SaveError, PlanError) as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("non_tensor", "SaveError", r"rank 1: TypeError: state dict entry 'step' is a int"),
        ("shape", "PlanError", r"'w' differs across ranks: F32\[4, 4\] on rank\(s\) 0,2 but F32\[4, 5\] on rank\(s\) 1"),
        ("dtype", "PlanError", r"'b' differs across ranks: F16\[4\] on rank\(s\) 0 but F32\[4\] on rank\(s\) 1,2"),
        ("foreign", "SaveError", r"rank 0: SaveError: .* not empty and was not written by dist_saver"),
    ],
    ids=["non_tensor", "shape", "dtype", "foreign"],
)
def test_bad_input_raises_on_every_rank_without_hanging(tmp_path, case, error, pattern):
    path = tmp_path / "ck"
    if case == "foreign":
        path.mkdir()
        (path / "config.yaml").write_text("x")
    outs = run_ranks(_bad_input, 3, str(path), case, timeout=90)
    import re

    for out in outs:
        assert out is not None, "every rank must raise"
        assert out[0] == error and re.search(pattern, out[1]), out
    assert not (path / fmt.INDEX_NAME).exists()


def _load_mismatch(rank, world, path):
    dist_save({"w": torch.ones(2, 3)}, path)
    target = {"w": torch.zeros(2, 3) if rank == 0 else torch.zeros(3, 3)}
    try:
        dist_load(target, path)
    except CheckpointError as e:
        return str(e)


def test_load_mismatch_on_one_rank_raises_everywhere(tmp_path):
    outs = run_ranks(_load_mismatch, 2, str(tmp_path / "ck"))
    for out in outs:
        assert out and "rank 1" in out and "'w'" in out and "model-00001-of-00001.safetensors" in out
