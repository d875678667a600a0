"""Loads as the mirror of saves (issue 21): one contract for every process group.

- Under a world group that carries no host tensors (NCCL's, in every GPU job; imitated here by a
  gloo backend registered for the "cuda" device only, the DTensors on gloo meshes), saves and
  loads of every layout into every other, and a resume with its optimizer, are bit-exact: their
  collectives run on a gloo group of dist_saver's own.
- A rank that never calls dist_load is named in a CollectiveError within the load's timeout.
- The same fault raises the same exception class at 1 rank and at 2.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from dist_saver import (CheckpointError, CollectiveError, DistSaverError, SaveError, dist_load, dist_save,
                        load_state_dict)
from dist_saver import format as fmt

from .dist_utils import CUDA_ONLY, attempt, run_ranks
from .helpers import assert_bitwise_equal
from .sharded_models import build, full_state_dict, reference_state_dict

# (save layout, load layout) pairs run in one 4-rank launch: Shard(0) <-> Shard(1) (FSDP2 <-> the
# rowwise/colwise TP plan), replicated, 2-D
PAIRS = [("fsdp", "tp"), ("tp", "fsdp"), ("none", "2d"), ("2d", "fsdp"), ("tp", "2d")]


def _layouts_without_host_collectives(rank, world, root):
    out = {"world refuses host tensors": None}
    try:  # the imitation holds: a host-tensor collective on the world group fails, as under NCCL
        dist.all_reduce(torch.ones(1))
        out["world refuses host tensors"] = False
    except Exception:  # noqa: BLE001
        out["world refuses host tensors"] = True
    reference = reference_state_dict()
    for src, dst in PAIRS:
        def case(src=src, dst=dst):
            path = os.path.join(root, f"{src}-{dst}")
            dist_save(build(src, world, backend="gloo"), path, timeout=60)
            target = build(dst, world, seed=7, backend="gloo")
            dist_load(target, path, timeout=60)
            assert_bitwise_equal(full_state_dict(target), reference)
        out[f"{src}->{dst}"] = attempt(case)
    out["resume"] = attempt(_resume_with_optimizer, world, os.path.join(root, "resume"))
    return out


def _resume_with_optimizer(world, path):
    import torch.nn.functional as F

    from .test_resume import VOCAB, batch, build as build_llama, make_optimizer, optimizer_snapshot

    model = build_llama("fsdp", world, backend="gloo")
    opt, sched = make_optimizer(model)
    for step in (1, 2):  # FSDP2's collectives run on its mesh's gloo group
        ids = batch(step).chunk(world)[dist.get_rank()]
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    dist_save(model, path, optimizer=opt, train_state={"step": 2}, timeout=60)
    saved = optimizer_snapshot(opt)
    fresh = build_llama("fsdp", world, seed=5, backend="gloo")
    opt2, _ = make_optimizer(fresh, lr=0.5)
    res = dist_load(fresh, path, optimizer=opt2, timeout=60)
    assert res.train_state == {"step": 2}
    assert_bitwise_equal(optimizer_snapshot(opt2)["state"], saved["state"])
    assert optimizer_snapshot(opt2)["groups"] == saved["groups"]
    assert_bitwise_equal(full_state_dict(fresh), full_state_dict(model))


def test_every_layout_loads_into_every_other_when_the_world_group_carries_no_host_tensors(tmp_path):
    outs = run_ranks(_layouts_without_host_collectives, 4, str(tmp_path), world_backend=CUDA_ONLY, timeout=300)
    for rank, out in enumerate(outs):
        assert out.pop("world refuses host tensors") is True, "the imitation of an NCCL world does not hold"
        failed = {case: res for case, (ok, res) in out.items() if not ok}
        assert not failed, f"rank {rank}: " + "\n".join(f"{c}: {r}" for c, r in failed.items())


# ---------------------------------------------------------------------------------------------------
# a rank that never calls dist_load


def _one_rank_skips_the_load(rank, world, path, saved_first):
    weights = {"w": torch.arange(64.0).reshape(8, 8)}
    if saved_first:  # the group of this timeout exists: the call's own entry names the absent rank
        dist_save(weights, path, timeout=4)
    if rank == 1:
        time.sleep(10)  # alive, but never calls dist_load
        return None
    t0 = time.monotonic()
    try:
        dist_load({"w": torch.zeros(8, 8)}, path if saved_first else path + "-none", timeout=4)
    except DistSaverError as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "returned", "", time.monotonic() - t0


@pytest.mark.parametrize("saved_first", [False, True], ids=["first call", "after a save"])
def test_a_rank_that_never_calls_dist_load_is_named_within_the_timeout(tmp_path, saved_first):
    outs = run_ranks(_one_rank_skips_the_load, 2, str(tmp_path / "ck"), saved_first, timeout=90)
    kind, message, took = outs[0]
    assert kind == "CollectiveError", (kind, message)
    assert re.search(r"rank\(s\) 1 of 2 did not call dist_load within the load's timeout of 4s", message), message
    assert took < 9, took


# ---------------------------------------------------------------------------------------------------
# the same fault, the same exception class, at 1 rank and at 2


def _checkpoint(path):
    if not os.path.exists(os.path.join(path, fmt.INDEX_NAME)):
        dist_save({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}, path, overwrite=True)


def _flip_a_data_byte(path):
    file = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    with open(os.path.join(path, file), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


FAULTS = {  # name -> (prepare the directory (rank 0, once), the call every rank makes)
    "a missing shard file": (lambda p: [os.remove(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors")][:1],
                             lambda p: dist_load({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, p)),
    "a flipped data byte": (_flip_a_data_byte, lambda p: dist_load({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, p)),
    "a shape that differs": (None, lambda p: dist_load({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, p)),
    "a missing index": (lambda p: os.remove(os.path.join(p, fmt.INDEX_NAME)),
                        lambda p: dist_load({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, p)),
    "a target that is not a tensor": (None, lambda p: dist_load({"a": 3, "b": torch.zeros(5)}, p)),
    "optimizer= with a state dict": (None, lambda p: dist_load({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, p,
                                                              optimizer=object())),
    "load_state_dict of a damaged file": (_flip_a_data_byte, lambda p: load_state_dict(p)),
    "saving a non-tensor": (None, lambda p: dist_save({"a": 3}, p + "-new")),
    "saving over a checkpoint": (None, lambda p: dist_save({"a": torch.zeros(2)}, p)),
}


def _each_fault(rank, world, root):
    out = {}
    for name, (prepare, call) in FAULTS.items():
        path = os.path.join(root, re.sub(r"\W+", "-", name))
        if rank == 0:
            _checkpoint(path) if world == 1 else None
        if world > 1:
            if rank == 0:
                _checkpoint_alone(path)
            dist.barrier()
        if prepare is not None and rank == 0:
            prepare(path)
        if world > 1:
            dist.barrier()
        try:
            call(path)
            out[name] = "returned"
        except Exception as e:  # noqa: BLE001  (the class is the point)
            out[name] = type(e).__name__
        if world > 1:
            dist.barrier()
    return out


def _checkpoint_alone(path):
    """The checkpoint a fault is injected into, written by one rank (a group of its own)."""
    group = dist.new_group([dist.get_rank()])
    if not os.path.exists(os.path.join(path, fmt.INDEX_NAME)):
        dist_save({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}, path, overwrite=True,
                  process_group=group)


def test_the_same_fault_raises_the_same_class_at_one_rank_and_at_two(tmp_path):
    one = _each_fault(0, 1, str(tmp_path / "one"))  # this process, no process group
    two = run_ranks(_each_fault, 2, str(tmp_path / "two"), timeout=150)
    expected = {"saving a non-tensor": SaveError.__name__, "saving over a checkpoint": SaveError.__name__}
    for name in FAULTS:
        want = expected.get(name, CheckpointError.__name__)
        assert one[name] == two[0][name] == two[1][name] == want, (name, one[name], two[0][name], two[1][name])
    assert not issubclass(CollectiveError, (SaveError, CheckpointError))
    assert issubclass(CollectiveError, DistSaverError) and issubclass(CheckpointError, DistSaverError)
