"""Block checksums (one xxh3_64 digest per 1 MiB-aligned block of a range) and the shard marker.

BlockHasher is checked against a reference computed here directly with xxhash; saved checkpoints
(one process, and real 2-rank process groups: replicated and FSDP-like Shard(0), page cache and
O_DIRECT) are checked range by range against that reference recomputed from the file bytes, and
every shard's header and both indexes against the save's checkpoint id.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from dist_saver import dist_save
from dist_saver import format as fmt
from dist_saver.checksum import BLOCK_BYTES, BlockHasher, parse
from dist_saver.plan import TensorInfo, make_plan
from dist_saver.writer import Streamer

from .dist_utils import run_ranks

MiB = 1 << 20


def reference(data: bytes, begin: int) -> str:
    """The block checksum of data, the bytes at file offsets [begin, begin + len(data)): xxh3_64
    of each piece between consecutive multiples of 1 MiB, computed without dist_saver."""
    end = begin + len(data)
    cuts = [begin, *range((begin // MiB + 1) * MiB, end, MiB), end]
    return "xxh3_64@1048576:" + "".join(xxhash.xxh3_64(data[a - begin : b - begin]).hexdigest()
                                        for a, b in zip(cuts, cuts[1:]))


# ---------------------------------------------------------------- BlockHasher, pure

RANGES = {
    "unaligned, crossing several boundaries": (1000, 3 * MiB + 5),
    "shorter than a block": (5, 1000),
    "one byte": (3 * MiB + 7, 3 * MiB + 8),
    "exactly a block": (MiB, 2 * MiB),
    "a block from 0": (0, MiB),
    "two bytes astride a boundary": (MiB - 1, MiB + 1),
    "aligned start, unaligned end": (2 * MiB, 4 * MiB + 3),
    "unaligned start, aligned end": (MiB + 4096, 3 * MiB),
}


def _feeds(n: int, rng: random.Random):
    """Ways to cut n bytes into pieces: all at once, 4 KiB pages, random sizes, 1 MiB pieces."""
    yield "whole", [n]
    yield "pages", [4096] * (n // 4096) + ([n % 4096] if n % 4096 else [])
    sizes, left = [], n
    while left:
        k = min(left, rng.choice([1, 3, 4095, 65537, MiB - 1, MiB + 1, 2 * MiB]))
        sizes.append(k)
        left -= k
    yield "random", sizes
    yield "MiB", [MiB] * (n // MiB) + ([n % MiB] if n % MiB else [])


@pytest.mark.parametrize("case", sorted(RANGES))
def test_block_hasher_matches_the_reference(case):
    begin, end = RANGES[case]
    data = random.Random(case).randbytes(end - begin)
    want = reference(data, begin)
    for how, sizes in _feeds(end - begin, random.Random(case)):
        h = BlockHasher(begin, end)
        at = begin
        for k in sizes:
            h.update(memoryview(data)[at - begin : at - begin + k], at)
            at += k
        assert h.digest() == want, how
    blocks = len(range(begin // MiB, (end - 1) // MiB + 1))
    assert len(want.split(":", 1)[1]) == 16 * blocks
    recorded = parse(want, begin, end)
    assert (recorded.algorithm, recorded.block, len(recorded.digests)) == ("xxh3_64", BLOCK_BYTES, blocks)
    assert recorded.spans(begin, end)[0][0] == begin and recorded.spans(begin, end)[-1][1] == end


def test_block_hasher_refuses_bytes_out_of_order_too_many_or_too_few():
    h = BlockHasher(10, 20)
    with pytest.raises(ValueError, match="bytes at 11 fed, 10 expected"):
        h.update(b"x", 11)
    h.update(b"x" * 5, 10)
    with pytest.raises(ValueError, match="only 5 bytes fed"):
        h.digest()
    with pytest.raises(ValueError, match="more bytes fed"):
        h.update(b"x" * 6, 15)


# ---------------------------------------------------------------- the writer, one process

@pytest.mark.parametrize("base, lo, hi", [(0, 0, 16 * MiB), (4096, 100, 16 * MiB), (MiB - 4096, 0, 4096),
                                          (3 * MiB + 5, 0, 5 * MiB - 3), (12345, 7, 8), (MiB, 0, MiB)])
def test_page_cache_writes_are_cut_at_block_boundaries(base, lo, hi):
    """Each slice the writer thread hashes and writes lies in one block: hashed bytes are written
    while in the CPU's cache, and each feeds one block's digest."""
    from dist_saver.writer import _Job, _OpenFile, _pieces

    job = _Job(_OpenFile("f", 3), base, lo, hi, None, None, None, None)
    pieces = _pieces(job)
    assert [p[1] for p in pieces] == [lo] + [p[2] for p in pieces[:-1]] and pieces[-1][2] == hi
    for fd, x, y in pieces:
        assert fd == 3 and x < y and (base + x) // MiB == (base + y - 1) // MiB, (x, y)
    assert all((base + y) % MiB == 0 for _, _, y in pieces[:-1])


def _check_recorded(path: str, index: dict) -> int:
    """Every recorded range of every file of index equals the reference of its bytes on disk;
    the ranges tile the file, none of them empty. Returns the number of ranges."""
    ours = index["metadata"][fmt.META_KEY]
    count = 0
    for name, entry in ours["files"].items():
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        assert len(data) == entry["size"]
        at = 0
        for begin, length, rank, checksum in entry["ranges"]:
            assert begin == at and length > 0, (name, begin, length)
            assert checksum == reference(data[begin : begin + length], begin), (name, begin, length, rank)
            at += length
            count += 1
        assert at == len(data)
    return count


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("buffer_bytes", [64 << 10, 16 << 20])
def test_streamed_ranges_record_block_checksums(tmp_path, direct_io, buffer_bytes):
    """A range starting and ending mid-block, fed through the pool (small, strided and unstable
    tensors) and in place (>= 1 MiB stable contiguous tensors, at an unaligned file offset)."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(700, 1000, generator=g)
    tensors = [torch.randn(1000, generator=g),  # pooled
               torch.randn(3 * MiB // 4 + 3, generator=g),  # in place (3 MiB + 12 bytes), buffered
               wide.t()[:, 3:400],  # strided: copied into the pool
               torch.randint(0, 255, (MiB + 17,), generator=g, dtype=torch.uint8),  # in place, odd size
               torch.randn(5, generator=g)]
    n = sum(t.nbytes for t in tensors)
    lead, tail = MiB - 1000, 777
    size = lead + n + tail
    path = str(tmp_path / "f")
    with Streamer(buffer_bytes=buffer_bytes, count=2, direct_io=direct_io) as s:
        header = s.create(path, b"H" * lead, size)
        after = s.open_range(path, lead + n, size)
        after.put_bytes(b"T" * tail)
        ranges = [after.close()]
        stream = s.open_range(path, lead, lead + n)
        for i, t in enumerate(tensors):
            stream.put(t, stable=i != 2)
        ranges.append(stream.close())
        s.finish()
    data = open(path, "rb").read()
    want = b"H" * lead + b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                  for t in tensors) + b"T" * tail
    assert data == want
    for r in [header, *ranges]:
        assert r.checksum == reference(data[r.begin : r.end], r.begin), (r.begin, r.end)
    assert len(ranges[1].checksum.split(":")[1]) == 16 * (((lead + n - 1) // MiB) - (lead // MiB) + 1)


def test_checksums_off_records_nothing(tmp_path):
    dist_save({"w": torch.randn(MiB // 2)}, tmp_path / "m", checksums=False)
    index = json.loads((tmp_path / "m" / fmt.INDEX_NAME).read_text())
    ranges = [r for e in index["metadata"][fmt.META_KEY]["files"].values() for r in e["ranges"]]
    assert ranges and all(r[3] == "" for r in ranges)


def _marker(path: str, index: dict) -> str:
    """The checkpoint id that every shard of index and the index itself carry (the same one)."""
    ours = index["metadata"][fmt.META_KEY]
    cid = ours[fmt.CHECKPOINT_ID_KEY]
    assert ours["version"] == fmt.WRITTEN_VERSION
    assert isinstance(cid, str) and len(cid) == fmt.CHECKPOINT_ID_CHARS and int(cid, 16) >= 0
    for name in ours["files"]:
        with safe_open(os.path.join(path, name), "pt") as f:
            assert f.metadata() == {"format": "pt", fmt.SHARD_VERSION_KEY: fmt.WRITTEN_VERSION,
                                    fmt.SHARD_CHECKPOINT_KEY: cid}, name
    return cid


def test_a_training_checkpoint_has_one_id_in_every_file_and_both_indexes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 500), torch.nn.Linear(500, 7))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 600)).sum().backward()
    opt.step()
    path = str(tmp_path / "ck")
    dist_save(model, path, optimizer=opt, max_shard_size="1MiB", train_state={"step": 1})
    ids = set()
    for name in (fmt.INDEX_NAME, fmt.OPTIM_INDEX_NAME):
        with open(os.path.join(path, name)) as f:
            index = json.load(f)
        assert len(index["metadata"][fmt.META_KEY]["files"]) > 1
        _check_recorded(path, index)
        ids.add(_marker(path, index))
    assert len(ids) == 1
    # another save, another id
    dist_save(model, path, optimizer=opt, overwrite=True)
    with open(os.path.join(path, fmt.INDEX_NAME)) as f:
        assert _marker(path, json.load(f)) not in ids


def test_the_header_takes_the_id_without_changing_its_length():
    infos = [TensorInfo(f"t{i}", "F32", (3, 5), 60) for i in range(4)]
    infos.append(TensorInfo("0" * fmt.CHECKPOINT_ID_CHARS, "F32", (2,), 8))  # a name like the placeholder
    f = make_plan(infos, 1).files[0]
    a, b = "a" * fmt.CHECKPOINT_ID_CHARS, os.urandom(16).hex()
    ha, hb = f.header_for(a), f.header_for(b)
    assert len(ha) == len(hb) == len(f.header) == f.data_start and f.size == f.data_start + f.data_size
    meta = json.loads(hb[8:])["__metadata__"]
    assert meta == {"format": "pt", fmt.SHARD_VERSION_KEY: fmt.WRITTEN_VERSION, fmt.SHARD_CHECKPOINT_KEY: b}
    assert ha.replace(a.encode(), b.encode(), 1) == hb and ("0" * fmt.CHECKPOINT_ID_CHARS) in json.loads(hb[8:])
    with pytest.raises(ValueError, match="checkpoint id"):
        f.header_for("x" * (fmt.CHECKPOINT_ID_CHARS - 1))
    with pytest.raises(ValueError, match="checkpoint id"):
        f.header_for('"' * fmt.CHECKPOINT_ID_CHARS)


# ---------------------------------------------------------------- multi-rank saves

def big_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few MiB, odd sizes: ranges and Shard(0) pieces start and end mid-block."""
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(1537, 1000, generator=g),  # 5.9 MiB, 1537 rows split unevenly
            "proj": torch.randn(2001, 555, generator=g).bfloat16(),  # 2.1 MiB
            "norm": torch.randn(1000, generator=g),
            "ids": torch.randint(0, 1 << 40, (3 * MiB // 8 + 1,), generator=g),  # 3 MiB + 8
            "bias": torch.randn(333, generator=g).double(), "empty": torch.zeros(0, 3)}


def _save(rank, world, root, layout):
    state = big_state()
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() and k != "empty" else v
                 for k, v in state.items()}
    out = {}
    for direct in (False, True):
        for shard in (None, 3 * MiB):
            path = os.path.join(root, f"{layout}-{'direct' if direct else 'buffered'}-{shard}")
            res = dist_save(state, path, direct_io=direct, max_shard_size=shard)
            out[path] = [w for f in res.files for w in f.ranges]
    return out


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_multirank_saves_record_block_checksums_and_one_id(tmp_path, layout):
    saves = run_ranks(_save, 2, str(tmp_path), layout, timeout=300)[0]
    reference_state = big_state()
    for path, written in saves.items():
        with open(os.path.join(path, fmt.INDEX_NAME)) as f:
            index = json.load(f)
        ours = index["metadata"][fmt.META_KEY]
        assert _check_recorded(path, index) == len(written)
        assert {r.rank for r in written} == {0, 1}, "both ranks wrote"
        data_ranges = [r for r in written if r.begin >= 4096]
        assert any(r.end - r.begin > 2 * MiB for r in data_ranges), "ranges cross several blocks"
        if layout == "fsdp":  # rows written by the rank holding them, beside the owner's
            assert any(len({r[2] for r in e["ranges"]}) > 1 for e in ours["files"].values())
        _marker(path, index)
        got = {}
        for name in sorted(set(index["weight_map"].values())):
            got.update(load_file(os.path.join(path, name)))
        assert set(got) == set(reference_state)
        for k, v in reference_state.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), (path, k)
    ids = set()
    for path in saves:
        with open(os.path.join(path, fmt.INDEX_NAME)) as f:
            ids.add(json.load(f)["metadata"][fmt.META_KEY][fmt.CHECKPOINT_ID_KEY])
    assert len(ids) == len(saves), "each save has an id of its own"
