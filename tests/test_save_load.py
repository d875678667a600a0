"""Save and load in one process (world size 1, no process group)."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dist_saver import CheckpointError, SaveError, dist_load, dist_save, load_state_dict
from dist_saver import format as fmt
from dist_saver.synthetic import TinyLlama
from dist_saver import writer
from dist_saver.writer import FileOps, Streamer, using_file_ops

from .helpers import assert_bitwise_equal, check_checkpoint_files, mixed_state_dict


def test_roundtrip_every_dtype_tied_and_noncontiguous(tmp_path):
    sd = mixed_state_dict()
    result = dist_save(sd, tmp_path / "ck", max_shard_size="2KB")
    index = check_checkpoint_files(tmp_path / "ck")
    assert len(result.files) > 1 and result.world_size == 1
    assert index["metadata"]["dist_saver"]["aliases"] == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in index["weight_map"]
    back = load_state_dict(tmp_path / "ck")
    assert_bitwise_equal(back, sd)
    assert back["lm_head.weight"] is back["embed.weight"]
    # dist_load into fresh tensors, in place
    target = {k: torch.zeros_like(v) for k, v in sd.items() if k != "lm_head.weight"}
    target["lm_head.weight"] = target["embed.weight"]
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    dist_load(target, tmp_path / "ck")
    assert {k: v.data_ptr() for k, v in target.items()} == ptrs
    assert_bitwise_equal(target, sd)


def test_module_roundtrip_keeps_ties(tmp_path):
    src, dst = TinyLlama(seed=1), TinyLlama(seed=2)
    dist_save(src, tmp_path / "m")
    res = dist_load(dst, tmp_path / "m")
    assert_bitwise_equal(dst.state_dict(), src.state_dict())
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    assert res.files_opened == ["model-00001-of-00001.safetensors"]


def _stream_bytes(path, tensors, direct_io=True, buffer_bytes=4096, lead=1000, tail=777):
    """Stream tensors into bytes [lead, lead + n) of a file whose other bytes other streams write:
    the range starts and ends mid-block, as a rank's range does beside its neighbours'."""
    from dist_saver.checksum import BlockHasher

    n = sum(t.nbytes for t in tensors)
    size = lead + n + tail
    with Streamer(buffer_bytes=buffer_bytes, count=2, direct_io=direct_io) as s:
        s.create(str(path), b"H" * lead, size)  # the owner: header and size first
        after = s.open_range(str(path), lead + n, size)
        after.put_bytes(b"T" * tail)
        after.close()
        f = s.open_range(str(path), lead, lead + n)
        for t in tensors:
            f.put(t)
        rng = f.close()
        s.finish()
    data = open(path, "rb").read()
    assert len(data) == size and data[:lead] == b"H" * lead and data[lead + n :] == b"T" * tail
    h = BlockHasher(lead, lead + n)
    h.update(data[lead : lead + n], lead)
    assert (rng.begin, rng.end, rng.checksum) == (lead, lead + n, h.digest())
    return data[lead : lead + n], rng.direct_io


@pytest.mark.parametrize("direct_io", [True, False])
def test_stream_copies_any_strides_through_small_buffers(tmp_path, direct_io):
    wide = torch.arange(3 * 2000, dtype=torch.float32).reshape(3, 2000)  # 8000-byte rows > a buffer
    tensors = [
        torch.arange(10, dtype=torch.int64),
        torch.arange(300_000, dtype=torch.float32),  # >= 1 MiB: buffered streams write it in place
        wide.t()[:, 1:3],  # strided, rows of 8 bytes
        wide[:, ::2],  # strided, rows of 4000 bytes
        wide.t().contiguous().t(),  # strided rows larger than the buffer
        torch.arange(5000, dtype=torch.int16)[::3],
        torch.tensor(True),  # (larger item sizes first: offsets stay aligned, as in our files)
    ]
    data, direct = _stream_bytes(tmp_path / "f.bin", tensors, direct_io)
    assert direct == direct_io
    expected = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    assert data == expected


class _NoDirectIO(FileOps):
    def open(self, path, flags, mode=0o777):  # what e.g. some network filesystems answer
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().open(path, flags, mode)


def test_filesystems_without_o_direct_fall_back_to_buffered_writes(tmp_path):
    sd = {"a": torch.arange(3000, dtype=torch.int32), "b": torch.ones(7, dtype=torch.bfloat16)}
    with using_file_ops(_NoDirectIO()):
        result = dist_save(sd, tmp_path / "ck", direct_io=True)
    assert [f.direct_io for f in result.files] == [False]
    assert_bitwise_equal(load_state_dict(tmp_path / "ck"), sd)
    result = dist_save(sd, tmp_path / "ck2", direct_io=True)
    assert [f.direct_io for f in result.files] == [hasattr(os, "O_DIRECT")]
    assert_bitwise_equal(load_state_dict(tmp_path / "ck2"), sd)


def test_header_is_aligned_and_readable_by_safetensors(tmp_path):
    dist_save({"a": torch.ones(3, dtype=torch.float16)}, tmp_path / "c")
    header, start = fmt.read_header(str(tmp_path / "c" / fmt.shard_file_name(1, 1)))
    assert start % fmt.DATA_ALIGN == 0
    assert header["a"] == {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}


def test_load_state_dict_reads_other_tools_checkpoints(tmp_path):
    sd = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, single / "model.safetensors")
    assert_bitwise_equal(load_state_dict(single), sd)
    assert_bitwise_equal(load_state_dict(single / "model.safetensors"), sd)
    # a transformers-style sharded checkpoint: no dist_saver metadata
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"x": sd["x"]}, sharded / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"y": sd["y"]}, sharded / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (sharded / fmt.INDEX_NAME).write_text(json.dumps({
        "metadata": {"total_size": 88},
        "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    assert_bitwise_equal(load_state_dict(sharded, names=["y"]), {"y": sd["y"]})
    target = {"x": torch.zeros(3, 4), "y": torch.zeros(5, dtype=torch.int64)}
    dist_load(target, sharded)
    assert_bitwise_equal(target, sd)


def test_load_errors_name_the_tensor_and_file(tmp_path):
    dist_save({"w": torch.randn(4, 4), "b": torch.randn(4)}, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"'w'.*torch.float32\[4, 5\].*model-00001-of-00001.safetensors"):
        dist_load({"w": torch.zeros(4, 5), "b": torch.zeros(4)}, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"'w'.*bfloat16"):
        dist_load({"w": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(4)}, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"missing \['extra'\], unexpected \['b'\]"):
        dist_load({"w": torch.zeros(4, 4), "extra": torch.zeros(1)}, tmp_path / "c")
    with pytest.raises(CheckpointError, match="'nope' is not in the checkpoint"):
        load_state_dict(tmp_path / "c", names=["nope"])
    res = dist_load({"w": torch.zeros(4, 4)}, tmp_path / "c", strict=False)
    assert res.loaded == ["w"]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_state_dict(tmp_path)


def test_save_refuses_foreign_directory_and_bad_entries(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SaveError, match=r"not empty and was not written by dist_saver.*notes.txt"):
        dist_save({"a": torch.ones(1)}, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    with pytest.raises(SaveError, match=r"'step' is a int, not a tensor"):
        dist_save({"a": torch.ones(1), "step": 3}, tmp_path / "x")
    with pytest.raises(SaveError, match=r"'c'.*cannot be stored"):
        dist_save({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "x")
    with pytest.raises(ValueError, match="cannot parse size"):
        dist_save({"a": torch.ones(1)}, tmp_path / "x", max_shard_size="lots")


def test_resave_replaces_our_own_checkpoint_and_drops_stale_files(tmp_path):
    path = tmp_path / "c"
    dist_save({f"t{i}": torch.full((100,), i) for i in range(4)}, path, max_shard_size=800)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) == 4
    new = {"only": torch.arange(3)}
    with pytest.raises(SaveError, match="already holds a checkpoint; pass overwrite=True"):
        dist_save(new, path)
    dist_save(new, path, overwrite=True)
    assert sorted(os.listdir(path)) == sorted([fmt.INDEX_NAME, fmt.shard_file_name(1, 1)])
    assert_bitwise_equal(load_state_dict(path), new)


def test_parse_size():
    assert fmt.parse_size("5GB") == 5 * 10**9
    assert fmt.parse_size("512MiB") == 512 * 2**20
    assert fmt.parse_size("1.5kb") == 1500
    assert fmt.parse_size(123) == 123 and fmt.parse_size(None) is None
    for bad in ("0", "-1GB", "5 parsecs", 0):
        with pytest.raises(ValueError):
            fmt.parse_size(bad)


def test_one_summary_line_per_save_and_load(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="dist_saver")
    dist_save({"a": torch.ones(1000)}, tmp_path / "c")
    dist_load({"a": torch.zeros(1000)}, tmp_path / "c")
    lines = [r.getMessage() for r in caplog.records if r.name == "dist_saver"]
    assert len(lines) == 2
    assert lines[0].startswith(f"saved {tmp_path / 'c'}: ") and "1 files from 1 rank(s)" in lines[0]
    assert lines[1].startswith(f"loaded {tmp_path / 'c'}: ") and "slowest rank 0" in lines[1]


class _DropSpy(FileOps):
    """Records the end of every range the writeback drops from the page cache."""

    def __init__(self, lag):
        super().__init__(writeback_lag=lag)
        self.dropped = []

    def drop_cached(self, fd, offset, nbytes):
        super().drop_cached(fd, offset, nbytes)
        self.dropped.append(offset + nbytes)


def test_buffered_path_with_early_writeback_is_bit_exact(tmp_path):
    """The default buffered path: writeback starts per buffer, ranges behind the lag are dropped."""
    from dist_saver import verify

    gen = torch.Generator().manual_seed(7)
    sd = {"big": torch.randint(0, 255, (40 << 20,), dtype=torch.uint8, generator=gen),
          "odd": torch.randn(333, 77, generator=gen).t()}  # 40 MiB + a strided tail
    with using_file_ops(_DropSpy(1 << 20)) as ops:
        res = dist_save(sd, tmp_path / "ck")
    assert not any(f.direct_io for f in res.files)
    assert_bitwise_equal(load_state_dict(tmp_path / "ck"), sd)
    verify(tmp_path / "ck")
    if ops.can_writeback:  # Linux: the dirty tail stayed bounded
        assert max(ops.dropped) >= (40 << 20) - (1 << 20) - writer.DEFAULT_BUFFER_BYTES


class _FailingWriteback(FileOps):
    """sync_file_range that fails with err when it waits for a range to be on disk."""

    def __init__(self, err):
        super().__init__(writeback_lag=1 << 20)
        self.can_writeback, self.err = True, err

    def sync_file_range(self, fd, offset, nbytes, flags):
        if flags & writer.SFR_WAIT_AFTER:
            raise OSError(self.err, f"sync_file_range: {os.strerror(self.err)}")


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL])
def test_a_writeback_error_fails_the_save_but_an_unsupported_hint_does_not(tmp_path, err):
    """The waiting sync_file_range reports a write error once (fsync would not see it again), so
    it must fail the save; EINVAL only means the file system does not take the hint."""
    sd = {"w": torch.arange(4 << 20, dtype=torch.int32)}  # 16 MiB: past the lag
    with using_file_ops(_FailingWriteback(err)):
        if err == errno.EIO:
            with pytest.raises(SaveError, match="Input/output error"):
                dist_save(sd, tmp_path / "ck")
            assert not (tmp_path / "ck").exists()
        else:
            dist_save(sd, tmp_path / "ck")
            assert_bitwise_equal(load_state_dict(tmp_path / "ck"), sd)
