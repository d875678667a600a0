"""The planner: a pure function, tested at scale without processes."""

import time

import pytest

from dist_saver import format as fmt
from dist_saver.errors import PlanError
from dist_saver.plan import TensorInfo, assign_owners, make_plan, merge_metadata
from dist_saver.state import TensorMeta
from dist_saver.synthetic import TinyLlama
from dist_saver.state import collect


def infos_of(metas, holders=None):
    return [TensorInfo(m.name, m.dtype, m.shape, m.nbytes, holders) for m in metas]


def llama_infos(layers=8, **kw):
    model = TinyLlama(layers=layers, tie_embeddings=False, **kw)
    return infos_of(collect(model).metas)


def synthetic_infos(n, seed=0):
    import random

    rng = random.Random(seed)
    dtypes = ["BF16", "F32", "F16", "I64", "U8", "BOOL", "F8_E4M3"]
    out = []
    for i in range(n):
        dt = rng.choice(dtypes)
        shape = (rng.randint(0, 64), rng.randint(1, 4096)) if i % 7 else ()
        m = TensorMeta(f"layers.{i // 10}.w{i % 10}", dt, shape)
        out.append(TensorInfo(m.name, dt, shape, m.nbytes))
    return out


def check_plan_invariants(plan, infos):
    names = [i.name for i in infos]
    stored = [t.name for f in plan.files for t in f.tensors]
    assert sorted(stored) == sorted(names), "every tensor exactly once"
    assert len(stored) == len(set(stored))
    total = len(plan.files)
    for k, f in enumerate(plan.files, start=1):
        assert f.number == k and f.name == fmt.shard_file_name(k, total)
        offset = 0
        for t in f.tensors:  # packed, no holes, aligned to the dtype
            assert t.begin == offset and t.begin % fmt.itemsize(t.dtype) == 0
            offset = t.end
        assert offset == f.data_size
    assert [f.rank for f in plan.files] == sorted(f.rank for f in plan.files), "files numbered by rank"


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 16])
def test_balance_bound_and_contiguity_llama(world):
    infos = llama_infos(layers=8)
    plan = make_plan(infos, world)
    check_plan_invariants(plan, infos)
    total = sum(i.nbytes for i in infos)
    largest = max(i.nbytes for i in infos)
    assert max(plan.bytes_per_rank()) <= total / world + largest
    # consecutive tensors stay together: the owners along the state dict never go back
    owners = plan.owners()
    seq = [owners[i.name] for i in infos]
    assert seq == sorted(seq)


def test_balance_at_1024_ranks_50k_tensors_is_fast_and_bounded():
    infos = synthetic_infos(50_000)
    t0 = time.process_time()
    plan = make_plan(infos, 1024, max_shard_size=5 * 10**6)
    elapsed = time.process_time() - t0
    assert elapsed < 0.5, f"planning took {elapsed:.2f}s of CPU"
    check_plan_invariants(plan, infos)
    total = sum(i.nbytes for i in infos)
    largest = max(i.nbytes for i in infos)
    per_rank = plan.bytes_per_rank()
    assert max(per_rank) <= total / 1024 + largest
    assert all(f.data_size <= 5 * 10**6 or len(f.tensors) == 1 for f in plan.files)


def test_merge_1024_identical_ranks_is_fast():
    metas = [TensorMeta(i.name, i.dtype, i.shape) for i in synthetic_infos(50_000)]
    t0 = time.process_time()
    infos, aliases = merge_metadata([(range(1024), metas)], 1024)
    plan = make_plan(infos, 1024)
    assert time.process_time() - t0 < 1.0  # ~0.5 s on the dev VM: catches a quadratic step, not noise
    assert all(i.holders is None for i in infos) and len(plan.owners()) == 50_000


def test_deterministic():
    infos = synthetic_infos(5000, seed=3)
    assert make_plan(infos, 64, 10**6) == make_plan(list(infos), 64, 10**6)


def test_max_shard_size_splits_each_ranks_run():
    infos = [TensorInfo(f"t{i}", "F32", (250,), 1000) for i in range(10)]
    plan = make_plan(infos, 2, max_shard_size=2500)
    # 5000 bytes per rank, 2 tensors per file -> 3 files per rank (2+2+1)
    assert [len(f.tensors) for f in plan.files] == [2, 2, 1, 2, 2, 1]
    assert [f.rank for f in plan.files] == [0, 0, 0, 1, 1, 1]
    assert plan.files[-1].name == "model-00006-of-00006.safetensors"
    big = make_plan([TensorInfo("huge", "U8", (10,), 10)], 1, max_shard_size=3)
    assert len(big.files) == 1  # a tensor larger than the limit gets a file of its own


def test_more_ranks_than_tensors_and_empty_tensors():
    infos = [TensorInfo("a", "F32", (4,), 16), TensorInfo("e", "F32", (0,), 0), TensorInfo("s", "I64", (), 8)]
    plan = make_plan(infos, 8)
    check_plan_invariants(plan, infos)
    assert len(plan.files) <= 3
    empty = make_plan([TensorInfo("e", "F32", (0, 3), 0)], 4)
    check_plan_invariants(empty, [TensorInfo("e", "F32", (0, 3), 0)])


def test_offsets_aligned_with_mixed_dtypes_in_one_file():
    infos = [TensorInfo("b", "BOOL", (3,), 3), TensorInfo("h", "F16", (3,), 6), TensorInfo("d", "F64", (1,), 8),
             TensorInfo("i", "I32", (1,), 4)]
    plan = make_plan(infos, 1)
    check_plan_invariants(plan, infos)
    assert [t.name for t in plan.files[0].tensors] == ["d", "i", "h", "b"]


def test_subset_holders_own_their_tensors():
    # pipeline-like: stage 0 on ranks 0,1 and stage 1 on ranks 2,3
    stage0 = [TensorMeta(f"s0.{i}", "F32", (100,)) for i in range(6)]
    stage1 = [TensorMeta(f"s1.{i}", "F32", (100,)) for i in range(6)]
    infos, _ = merge_metadata([([0, 1], stage0), ([2, 3], stage1)], 4)
    plan = make_plan(infos, 4)
    owners = plan.owners()
    assert {owners[m.name] for m in stage0} == {0, 1}
    assert {owners[m.name] for m in stage1} == {2, 3}
    check_plan_invariants(plan, infos)


def test_mismatch_names_tensor_and_ranks():
    a = [TensorMeta("w", "F32", (4, 4))]
    b = [TensorMeta("w", "F32", (4, 5))]
    with pytest.raises(PlanError, match=r"'w'.*F32\[4, 4\] on rank\(s\) 0,2.*F32\[4, 5\] on rank\(s\) 1"):
        merge_metadata([([0, 2], a), ([1], b)], 3)
    c = [TensorMeta("w", "BF16", (4, 4))]
    with pytest.raises(PlanError, match="BF16"):
        merge_metadata([([0], a), ([1], c)], 2)


def test_alias_conflicts():
    metas = [TensorMeta("emb", "F32", (4,)), TensorMeta("other", "F32", (4,))]
    with pytest.raises(PlanError, match="'head' is tied"):
        merge_metadata([([0], metas), ([1], metas)], 2, [{"head": "emb"}, {"head": "other"}])
    with pytest.raises(PlanError, match="separate tensor"):
        merge_metadata([([0], metas), ([1], metas + [TensorMeta("head", "F32", (4,))])], 2,
                       [{"head": "emb"}, {}])
    infos, aliases = merge_metadata([([0, 1], metas)], 2, [{"head": "emb"}])
    assert make_plan(infos, 2, aliases=aliases).aliases == {"head": "emb"}


def test_assign_owners_never_gives_a_rank_more_than_ideal_plus_largest():
    import random

    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 60)
        world = rng.randint(1, 12)
        infos = [TensorInfo(str(i), "U8", (s,), s) for i, s in enumerate(rng.choice([0, 1, 10, 1000, 5000])
                                                                        for _ in range(n))]
        owners = assign_owners(infos, world)
        loads = [0] * world
        for i, r in zip(infos, owners):
            loads[r] += i.nbytes
        total = sum(loads)
        assert max(loads) <= total / world + max(i.nbytes for i in infos)
        assert owners == sorted(owners)


def test_fast_paths_plan_as_the_general_ones():
    """One group (every rank alike) and files of whole tensors take shortcuts; same answers."""
    from dist_saver.plan import _extents, _segments

    metas = [TensorMeta(i.name, i.dtype, i.shape) for i in synthetic_infos(3000, seed=4)]
    one, _ = merge_metadata([(range(4), metas)], 4)
    split, _ = merge_metadata([([0, 1], metas), ([2, 3], metas)], 4)
    assert one == split and all(i.holders is None for i in one)
    part, _ = merge_metadata([([1, 3], metas)], 4)
    assert all(i.holders == (1, 3) for i in part) and [i[:4] for i in part] == [i[:4] for i in one]
    with pytest.raises(PlanError, match=r"'w' differs across ranks: F32\[4\] on rank\(s\) 0"):
        merge_metadata([([0], [TensorMeta("w", "F32", (4,)), TensorMeta("w", "F32", (5,))])], 1)
    for world, limit in ((1, None), (4, None), (4, 10**5)):
        plan = make_plan(one, world, limit)
        check_plan_invariants(plan, one)
        load = [0] * world
        for f in plan.files:
            assert f.extents == _extents([s for e in f.tensors for s in _segments(e, f.rank, None, load)])
        assert load == plan.bytes_per_rank()
