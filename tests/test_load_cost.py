"""The per-tensor cost of a load (mixture-of-experts checkpoints hold 10^5 tensors): bounded work
per tensor, few vectored reads, and the fast paths giving what the general ones give."""

from __future__ import annotations

import cProfile
import gc
import json
import math
import os
import pstats
import random
import re
import struct

import pytest
import torch

from dist_saver import CheckpointError, dist_load, dist_save, load_state_dict
from dist_saver import format as fmt
from dist_saver.checksum import Recorded
from dist_saver.index import open_shard, read_index
from dist_saver.load import _tie_groups
from dist_saver.reader import MAX_IOVECS, ShardFile, _Block, _Checks

from .helpers import assert_bitwise_equal


def _experts(n: int, shape=(8, 4), dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {f"model.layers.{i // 256}.mlp.experts.{i % 256}.w{i % 3}": torch.randn(shape, generator=gen).to(dtype)
            for i in range(n)}


def _calls(fn) -> int:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof).total_calls


def test_a_load_makes_a_bounded_number_of_calls_per_tensor(tmp_path):
    """Function calls (Python and builtin, as cProfile counts them) per tensor, from the growth
    between 500 and 1000 tensors: 106 (dist_load) and 75 (load_state_dict) before this was made
    lean, 24 and 15 after."""
    per = {}
    for n in (500, 1000):
        sd = _experts(n)
        dist_save(sd, tmp_path / str(n))
        target = {k: torch.empty_like(v) for k, v in sd.items()}
        path = tmp_path / str(n)
        dist_load(target, path)  # warm: imports, the process group of one, buffers
        per[n] = (_calls(lambda: dist_load(target, path)), _calls(lambda: load_state_dict(path)))
        assert_bitwise_equal(target, sd)
    dist_calls, lsd_calls = ((b - a) / 500 for a, b in zip(per[500], per[1000]))
    assert dist_calls <= 30, dist_calls
    assert lsd_calls <= 20, lsd_calls


def test_small_tensors_share_vectored_reads(tmp_path):
    """2000 tensors of 64 bytes: a few preadv calls of up to MAX_IOVECS buffers each, checked."""
    n = 2000
    sd = _experts(n)
    dist_save(sd, tmp_path / "ck")
    calls = []
    preadv = ShardFile._preadv

    def traced(self, views, offset):
        calls.append((offset, len(views)))
        return preadv(self, views, offset)

    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    ShardFile._preadv = traced
    try:
        res = dist_load(target, tmp_path / "ck")
        back = load_state_dict(tmp_path / "ck")
    finally:
        ShardFile._preadv = preadv
    assert_bitwise_equal(target, sd)
    assert_bitwise_equal(back, sd)
    size = os.path.getsize(tmp_path / "ck" / fmt.shard_file_name(1, 1))
    assert res.bytes_verified == size  # every block checked, the header's too
    data_calls = [c for c in calls if c[0] > 0]  # the header's blocks are read at offset 0
    assert all(k <= MAX_IOVECS for _, k in data_calls)
    assert len(data_calls) <= 2 * (math.ceil(n / MAX_IOVECS) + 1)  # the two loads


def test_gc_is_left_as_it_was(tmp_path):
    sd = _experts(50)
    dist_save(sd, tmp_path / "ck")
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    assert gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            dist_load(target, tmp_path / "ck")
            load_state_dict(tmp_path / "ck")
            assert gc.isenabled() == enabled
            with pytest.raises(CheckpointError):
                load_state_dict(tmp_path / "ck", ["nope"])
            with pytest.raises(CheckpointError):
                dist_load({"nope": torch.empty(1)}, tmp_path / "ck")
            assert gc.isenabled() == enabled
    finally:
        gc.enable()


def test_targets_are_tied_only_when_they_are_one_view():
    base = torch.arange(16.0)
    square = base.view(4, 4)
    targets = {"a": square, "tied": square, "same_view": base.view(4, 4), "flat": base, "first_row": square[0],
               "t": square.t(), "empty": torch.empty(0), "empty2": torch.empty(0), "p": torch.nn.Parameter(square)}
    groups, tensors, layouts = _tie_groups(targets)
    assert [[t.name for t in g] for g in groups] == [["a", "tied", "same_view", "p"], ["flat"], ["first_row"], ["t"],
                                                    ["empty"], ["empty2"]]
    assert not tensors["p"].requires_grad and tensors["p"].data_ptr() == square.data_ptr() and layouts == {}
    with pytest.raises(TypeError, match="target entry 'x' is a int, not a tensor"):
        _tie_groups({"x": 3})


def test_reads_of_random_boxes_and_subsets_check_every_block(tmp_path):
    """Tensors across 1 MiB blocks, read in random subsets and boxes (whole, rows, columns, into
    non-contiguous targets, two targets of one tensor), every block checked once per open file."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randint(-1000, 1000, (rng.choice((1, 3, 200, 700)), rng.choice((1, 5, 300))),
                                 dtype=torch.int32, generator=gen) for i in range(60)}
    dist_save(sd, tmp_path / "ck", max_shard_size=3 << 20)
    index = read_index(str(tmp_path / "ck"))
    for trial in range(20):
        file = rng.choice(sorted(set(index.weight_map.values())))
        names = [n for n, f in index.weight_map.items() if f == file]
        with open_shard(index, file) as f:
            requests, want = [], []
            for name in rng.sample(names, rng.randint(1, len(names))):
                t = sd[name]
                for _ in range(rng.choice((1, 1, 2))):
                    r0 = rng.randrange(t.shape[0])
                    c0 = rng.randrange(t.shape[1])
                    box = rng.choice([None, ((r0, 0), (t.shape[0] - r0, t.shape[1])),
                                      ((r0, c0), (rng.randint(1, t.shape[0] - r0), rng.randint(1, t.shape[1] - c0)))])
                    piece = t if box is None else t[box[0][0]:box[0][0] + box[1][0], box[0][1]:box[0][1] + box[1][1]]
                    out = torch.zeros_like(piece) if rng.random() < 0.7 else torch.zeros(piece.shape[::-1],
                                                                                         dtype=t.dtype).t()
                    requests.append((name, out, box))
                    want.append(piece)
            f.read_many(requests)
            for (name, out, box), piece in zip(requests, want):
                assert torch.equal(out, piece), (trial, name, box)
            checked = f.bytes_checked
            f.read_many(requests)  # again: nothing left to check
            assert f.bytes_checked == checked and checked > 0


def _reference_blocks(checks: _Checks, spans) -> list[tuple]:
    """The blocks the spans touch, block by block (the definition)."""
    out = []
    for i, (begin, end, _, rec) in enumerate(checks.ranges):
        if rec is None:
            continue
        cuts = [(begin, end)] if rec.block is None else list(rec.spans(begin, end))
        for k, (a, b) in enumerate(cuts):
            if (i, k) not in checks.done and any(s < b and a < e for s, e, *_ in spans if e > s):
                out.append((a, b, rec.digests[k], checks.ranges[i][2], (i, k)))
    return out


def test_the_blocks_a_sweep_checks_are_those_its_spans_touch():
    rng = random.Random(1)
    for trial in range(300):
        size, block = rng.randint(1, 5000), rng.choice((7, 64, 1000))
        cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(0, 6)))) if size > 1 else []
        bounds = [0] + cuts + [size]
        checks = _Checks.__new__(_Checks)
        checks.ranges = []
        for b, e in zip(bounds, bounds[1:]):
            kind = rng.random()
            if kind < 0.15:
                rec = None
            elif kind < 0.3:
                rec = Recorded("xxh3_64", None, ("0" * 16,))
            else:
                n = -(-(e - (b // block + 1) * block) // block) + 1 if e > (b // block + 1) * block else 1
                rec = Recorded("xxh3_64", block, tuple(f"{k:016x}" for k in range(n)))
            checks.ranges.append((b, e, rng.randrange(4), rec))
        checks.done = {(rng.randrange(len(checks.ranges)), rng.randrange(3)) for _ in range(rng.randrange(3))}
        points = sorted(rng.sample(range(size + 1), min(size + 1, 2 * rng.randint(1, 6))))
        spans = [(a, b, 0) for a, b in zip(points[::2], points[1::2])]
        got = [tuple(blk) for blk in checks.unchecked(spans)]
        assert got == _reference_blocks(checks, spans), (trial, checks.ranges, spans)
        assert all(isinstance(blk, _Block) for blk in checks.unchecked(spans))


def _write_shard(path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize("case, entries, size, error", [
    ("out of data order", {"b": ("F32", [2], [8, 16]), "a": ("F32", [2], [0, 8])}, 16, None),
    ("empty and 0-d", {"e": ("F32", [0, 3], [0, 0]), "s": ("F64", [], [0, 8])}, 8, None),
    ("a bool dim", {"a": ("F32", [True, 2], [0, 8])}, 8, "field shape [True, 2] is not a list"),
    ("a float offset", {"a": ("F32", [2], [0.0, 8])}, 8, "field data_offsets [0.0, 8] is not"),
    ("offsets of three", {"a": ("F32", [2], [0, 4, 8])}, 8, "field data_offsets [0, 4, 8] is not"),
    ("offsets a string", {"a": ("F32", [2], "08")}, 8, "field data_offsets '08' is not"),
    ("a negative dim pair", {"a": ("F32", [-2, -1], [0, 8])}, 8, "field shape [-2, -1] is not a list"),
    ("a short entry", {"a": ("F32", [3], [0, 8])}, 8, "has data offsets [0, 8] that do not fit it"),
    ("a hole", {"a": ("F32", [1], [0, 4]), "b": ("F32", [1], [8, 12])}, 12, "data bytes [4, 8) before tensor 'b'"),
    ("overlap", {"a": ("F32", [2], [0, 8]), "b": ("F32", [1], [4, 8])}, 8, "tensors 'a' and 'b' overlap"),
    ("trailing bytes", {"a": ("F32", [1], [0, 4])}, 8, "the tensors fill 4 bytes of data"),
    ("past the end", {"a": ("F32", [4], [0, 16])}, 8, "has data offsets [0, 16] that do not fit the file"),
])
def test_header_entries_are_checked_as_the_slow_path_checks_them(tmp_path, case, entries, size, error):
    header = {"__metadata__": {"format": "pt"}}
    header.update({n: {"dtype": d, "shape": s, "data_offsets": o} for n, (d, s, o) in entries.items()})
    path = tmp_path / "model.safetensors"
    _write_shard(path, header, bytes(size))
    if error is not None:
        with pytest.raises(CheckpointError, match=r"model.safetensors: .*" + re.escape(error)):
            load_state_dict(path)
        return
    with ShardFile(str(path)) as f:
        assert f.names() == list(entries)
        for name, (code, shape, offsets) in entries.items():
            assert f.info(name) == (fmt.torch_dtype(code), tuple(shape), f.data_start + offsets[0])
    assert sorted(load_state_dict(path)) == sorted(entries)

