"""Repeated saves reuse their plan (issues 19, 20): a save whose every rank describes the same
tensors, layouts and options as at its previous save on the same group gathers only digests and
reuses that plan; anything else re-plans, and the decision is the same on every rank."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dist_saver import dist_save, load_state_dict

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal


def _sd(shape=(16, 8), dtype=torch.float32, name="b", value=1.0):
    return {"a": torch.full((32, 4), value), name: torch.full(shape, value, dtype=dtype)}


def _sequence(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    steps = []  # (what changed, plan reused on this rank, the state dict saved)

    def save(what, sd, **kw):
        res = dist_save(sd, os.path.join(root, f"{len(steps)}"), **kw)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd.items()}
        if "dtype" in kw:
            full = {k: v.to(kw["dtype"]) for k, v in full.items()}
        steps.append((what, res.plan_reused, full))

    save("first", _sd())
    save("the same", _sd(value=2.0))  # new values, same structure
    save("a shape", _sd(shape=(16, 9)))
    save("the same", _sd(shape=(16, 9)))
    save("a dtype", _sd(shape=(16, 9), dtype=torch.bfloat16))
    save("a name", _sd(shape=(16, 9), dtype=torch.bfloat16, name="c"))
    save("the same", _sd(shape=(16, 9), dtype=torch.bfloat16, name="c"))
    sharded = {"a": distribute_tensor(torch.full((32, 4), 3.0), mesh, [Shard(0)]), "c": _sd()["b"]}
    save("a layout", sharded)
    save("the same", sharded)
    save("the file split", sharded, max_shard_size=300)
    save("the bucket", sharded, max_shard_size=300, bucket_size=4096)
    save("a train state", sharded, max_shard_size=300, bucket_size=4096, train_state={"step": 1})
    save("dtype=", sharded, max_shard_size=300, bucket_size=4096, train_state={"step": 1}, dtype=torch.float16)
    # one rank lost its cache (a restarted process): every rank plans
    if rank == 1:
        import dist_saver.save as save_mod

        save_mod._plans.clear()
    save("one rank's cache", _sd())
    save("the same", _sd())
    # numpy arrays: tensors cross the result queue as shared-memory handles that die with this process
    saved = [{k: (v.float().numpy(), str(v.dtype)) for k, v in sd.items()} for _, _, sd in steps]
    return [(what, reused) for what, reused, _ in steps], saved if rank == 0 else None


def test_a_save_reuses_its_plan_only_when_every_rank_describes_the_same(tmp_path):
    outs = run_ranks(_sequence, 2, str(tmp_path), timeout=150)
    decisions, saved = outs[0][0], outs[0][1]
    assert decisions == outs[1][0], "the ranks took different paths"
    assert [reused for _, reused in decisions] == [what == "the same" for what, _ in decisions], decisions
    for i, sd in enumerate(saved):
        want = {k: torch.from_numpy(a).to(getattr(torch, dt.split(".")[1])) for k, (a, dt) in sd.items()}
        assert_bitwise_equal(load_state_dict(tmp_path / str(i)), want)


def _alternating(rank, world, root):
    import dist_saver.save as save_mod

    structures = [_sd(name=f"s{i}") for i in range(save_mod.PLANS_KEPT + 1)]
    reused = []
    for k, i in enumerate([0, 1, 0, 1] + list(range(2, len(structures))) + [1, 0]):
        reused.append(dist_save(structures[i], os.path.join(root, f"{k}")).plan_reused)
    return reused


def test_saves_alternating_structures_each_reuse_their_plan_until_it_is_the_least_recent(tmp_path):
    """A job saving two structures in turn (training checkpoints and an export) reuses both plans;
    PLANS_KEPT are kept, the least recently used one goes first."""
    import dist_saver.save as save_mod

    outs = run_ranks(_alternating, 2, str(tmp_path), timeout=150)
    assert outs[0] == outs[1]
    n = save_mod.PLANS_KEPT
    # s0 s1 s0 s1: the last two reuse; s2..s{n}: new; then s1 (used after s0) is still kept, s0 is not
    assert outs[0] == [False, False, True, True] + [False] * (n - 1) + [True, False], outs[0]
    for k in range(len(outs[0])):
        assert load_state_dict(tmp_path / str(k)).keys() == {"a", f"s{([0, 1, 0, 1] + list(range(2, n + 1)) + [1, 0])[k]}"}


def _other_world(rank, world, root, init_file):
    first = [dist_save(_sd(), os.path.join(root, f"w3-{k}")).plan_reused for k in range(2)]
    dist.destroy_process_group()
    if rank == 2:
        return first, None
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    return first, dist_save(_sd(), os.path.join(root, "w2")).plan_reused


def test_another_world_never_reuses_the_old_worlds_plan(tmp_path):
    outs = run_ranks(_other_world, 3, str(tmp_path), str(tmp_path / "pg2"), timeout=150)
    assert [o[0] for o in outs] == [[False, True]] * 3
    assert [o[1] for o in outs[:2]] == [False, False]
    assert_bitwise_equal(load_state_dict(tmp_path / "w2"), _sd())
