"""Box reads with positioned reads: every box of a tensor, into any target."""

import itertools
import os

import pytest
import torch

from dist_saver import CheckpointError, dist_save
from dist_saver import format as fmt
from dist_saver.reader import ShardFile
from dist_saver.buffers import StagingBuffer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "ck"
    t = {"cube": torch.arange(5 * 6 * 7, dtype=torch.int32).reshape(5, 6, 7),
         "scalar": torch.tensor(3.5, dtype=torch.float64), "vec": torch.arange(9, dtype=torch.int16)}
    dist_save(t, path)
    return str(path / fmt.shard_file_name(1, 1)), t


def test_every_box_of_a_3d_tensor(saved):
    file, t = saved
    cube = t["cube"]
    with ShardFile(file) as f:
        for o0, o1, o2 in itertools.product(range(0, 5, 2), range(0, 6, 3), range(0, 7, 3)):
            for s0, s1, s2 in itertools.product((1, 5 - o0), (1, 6 - o1), (1, 7 - o2)):
                out = torch.empty(s0, s1, s2, dtype=torch.int32)
                n = f.read_into("cube", out, ((o0, o1, o2), (s0, s1, s2)), StagingBuffer(16))
                assert torch.equal(out, cube[o0:o0 + s0, o1:o1 + s1, o2:o2 + s2])
                assert n == out.numel() * 4  # exactly the box's bytes
        scalar = torch.empty((), dtype=torch.float64)
        f.read_into("scalar", scalar)
        assert scalar.item() == 3.5


def test_non_contiguous_target_goes_through_staging(saved):
    file, t = saved
    target = torch.zeros(7, 6, 5, dtype=torch.int32).permute(2, 1, 0)  # shape (5, 6, 7), not contiguous
    with ShardFile(file) as f:
        f.read_into("cube", target, staging=StagingBuffer(64))
    assert torch.equal(target, t["cube"])


def test_truncated_file_and_wrong_target(saved, tmp_path):
    file, _ = saved
    short = tmp_path / "short.safetensors"
    data = open(file, "rb").read()
    short.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"short.safetensors: tensor '\w+' .* do not fit"):
        with ShardFile(str(short)) as f:
            for name in f.names():
                f.info(name)
    with ShardFile(file) as f:
        with pytest.raises(CheckpointError, match="cannot read 'vec'"):
            f.read_into("vec", torch.empty(9, dtype=torch.int32))
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            f.info("nope")
    assert os.path.exists(file)


def test_column_boxes_of_narrow_rows_are_read_as_whole_rows(saved):
    file, t = saved
    cube = t["cube"]
    with ShardFile(file) as f:
        out = torch.empty(5, 6, 3, dtype=torch.int32)
        n = f.read_into("cube", out, ((0, 0, 4), (5, 6, 3)))  # runs of 12 bytes
        assert torch.equal(out, cube[:, :, 4:7])
        assert n == 5 * 6 * 7 * 4  # the rows it spans, in one sequential read


def test_both_readers_share_one_interface(saved, tmp_path):
    """ShardFile and LegacyFile: the same methods, the same box check, info's offset named."""
    from dist_saver.legacy import LegacyFile
    from dist_saver.index import open_weights
    from dist_saver.reader import WeightsFile

    file, t = saved
    legacy = tmp_path / fmt.LEGACY_SINGLE_NAME
    torch.save(t, legacy)
    header, start = fmt.read_header(file)
    with open_weights(file) as shard, open_weights(str(legacy)) as old:
        assert isinstance(shard, ShardFile) and isinstance(old, LegacyFile)
        assert isinstance(shard, WeightsFile) and isinstance(old, WeightsFile)
        assert sorted(shard.names()) == sorted(old.names()) and shard.ties() == old.ties() == {}
        for f in (shard, old):
            entry = f.info("cube")
            assert (entry.dtype, entry.shape) == (torch.int32, (5, 6, 7))
            with pytest.raises(CheckpointError, match=r"cannot read 'cube' box \[5, 6, 3\] torch.int32 into"):
                f.read_into("cube", torch.empty(5, 6, 2, dtype=torch.int32), ((0, 0, 4), (5, 6, 3)))
            out = torch.empty(2, 6, 7, dtype=torch.int32)
            assert f.read_into("cube", out, ((3, 0, 0), (2, 6, 7))) == out.nbytes == f.bytes_read
            assert torch.equal(out, t["cube"][3:])
        assert shard.info("cube").offset == start + header["cube"]["data_offsets"][0]
        assert old.info("cube").offset is None  # a zip of storages: no flat data region
