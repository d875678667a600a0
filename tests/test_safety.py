"""Never a broken checkpoint: atomic publish, failing ranks, locks, checksums, hostile files."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from dist_saver import CheckpointError, DistSaverError, SaveError, dist_load, dist_save, load_state_dict, verify
from dist_saver import format as fmt
from dist_saver.commit import Target

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, leftovers, new_state, old_state




def test_overwrite_publishes_whole_directories(tmp_path):
    path = tmp_path / "ck"
    dist_save(old_state(), path, max_shard_size=20_000)
    with pytest.raises(SaveError, match="pass overwrite=True"):
        dist_save(new_state(), path)
    assert_bitwise_equal(load_state_dict(path), old_state())
    dist_save(new_state(), path, overwrite=True)
    assert_bitwise_equal(load_state_dict(path), new_state())
    assert leftovers(path) == []


def test_interrupted_publish_is_recovered(tmp_path):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    t = Target(str(path))
    os.rename(t.path, t.previous)  # crashed between the two renames of a publish
    os.mkdir(t.staging)  # and a crashed save's staging area
    (tmp_path / ".ck.dist_saver-staging" / "model-00001-of-00001.safetensors").write_bytes(b"junk")
    dist_save(new_state(), path, overwrite=True)  # recovers, then replaces
    assert_bitwise_equal(load_state_dict(path), new_state())
    assert leftovers(path) == []
    os.rename(t.path, t.previous)
    t.recover()
    assert_bitwise_equal(load_state_dict(path), new_state())


def test_a_live_lock_refuses_a_concurrent_save_and_a_dead_one_is_taken_over(tmp_path):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    lock = Target(str(path)).lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump({"host": os.uname().nodename, "pid": other.pid, "since": time.time()}, f)
        with pytest.raises(SaveError, match=rf"another save into .* in progress .*pid {other.pid}"):
            dist_save(new_state(), path, overwrite=True)
        assert_bitwise_equal(load_state_dict(path), old_state())
    finally:
        other.kill()
        other.wait()
    dist_save(new_state(), path, overwrite=True)  # the owner is gone: stale lock
    assert not os.path.exists(lock)
    assert_bitwise_equal(load_state_dict(path), new_state())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("window", ["claim empty", "claim written", "linked, claim kept", "empty lock, old"])
def test_a_kill_while_taking_the_lock_never_blocks_the_next_save(tmp_path, window):
    """A process killed at any instant of taking the lock leaves nothing that refuses the next
    save (the kill -9 test of the manager once left an empty lock, 'held by pid ?', forever)."""
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    t = Target(str(path))
    claim = tmp_path / fmt.lock_claim_name("ck", "0123abcd")
    record = json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "since": time.time()})
    if window == "claim empty":  # killed between creating the claim and writing it
        claim.write_text("")
    elif window == "claim written":  # killed before the link
        claim.write_text(record)
    elif window == "linked, claim kept":  # killed after the link, before removing the claim
        claim.write_text(record)
        os.link(claim, t.lock)
    else:  # where the filesystem has no hard links: exclusive create, killed before the write
        open(t.lock, "w").close()
        os.utime(t.lock, (time.time() - 120, time.time() - 120))
    dist_save(new_state(), path, overwrite=True)
    assert_bitwise_equal(load_state_dict(path), new_state())
    assert leftovers(path) == []


def test_a_fresh_unreadable_lock_is_still_respected(tmp_path):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    open(Target(str(path)).lock, "w").close()  # a creator between its create and its write, maybe
    with pytest.raises(SaveError, match="in progress"):
        dist_save(new_state(), path, overwrite=True)
    assert_bitwise_equal(load_state_dict(path), old_state())


def _failing_rank(rank, world, path, how):
    import dist_saver.save as save_mod

    real = save_mod.write_share

    def failing(*args):
        if rank == 1:
            if how == "raise":
                raise RuntimeError("injected failure on rank 1")
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "efbig":  # a file-size limit: writes past it fail with EFBIG
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        return real(*args)

    real_index = save_mod.write_index

    def index_then_die(*args):  # rank 0 dies in the commit, with the new index staged
        real_index(*args)
        os.kill(os.getpid(), signal.SIGKILL)

    save_mod.write_share = failing
    if how == "kill_in_commit" and rank == 0:
        save_mod.write_index = index_then_die
    t0 = time.monotonic()
    try:
        dist_save(new_state(), path, overwrite=True, timeout=30)
    except DistSaverError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


@pytest.mark.parametrize("how, pattern", [
    ("raise", r"rank 1: RuntimeError: injected failure on rank 1"),
    ("efbig", r"rank 1: OSError: .*File too large"),
    ("kill", r"rank 0: a collective failed, so another rank died"),
    ("kill_in_commit", r"rank 1: a collective failed, so another rank died"),
])
def test_a_failing_rank_stops_the_save_and_keeps_the_old_checkpoint(tmp_path, how, pattern):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    dead = {"kill": (1,), "kill_in_commit": (0,)}.get(how, ())
    outs = run_ranks(_failing_rank, 2, str(path), how, timeout=90, expect_dead=dead)
    survivors = [o for o in outs if o is not None]
    assert survivors
    for message, seconds in survivors:
        assert message and re.search(pattern, message, re.S), message
        assert seconds < 60
    assert_bitwise_equal(load_state_dict(path), old_state())  # the previous checkpoint, intact
    assert verify(path)
    if not dead or dead == (1,):  # rank 0 survived and cleaned up
        assert not any(e.endswith("staging") for e in leftovers(path))
    dist_save(new_state(), path, overwrite=True)  # the next save cleans whatever is left
    assert leftovers(path) == []
    assert_bitwise_equal(load_state_dict(path), new_state())


def test_verify_names_the_damaged_file(tmp_path):
    path = tmp_path / "ck"
    dist_save(old_state(), path, max_shard_size=20_000)
    files = verify(path)
    assert len(files) > 1 and all(v.startswith(("xxh3_64:", "crc32:")) for v in files.values())
    victim = path / sorted(files)[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: checksum .* does not match"):
        verify(path)
    with pytest.raises(CheckpointError, match=victim.name):
        dist_load({k: torch.zeros(64, 64) for k in old_state()}, path, verify=True)


def _write_file(path, header: dict, data: bytes, header_len: int | None = None):
    body = json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)


def _index(directory, weight_map):
    (directory / fmt.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))


HOSTILE = {}


def hostile(fn):
    HOSTILE[fn.__name__] = fn
    return fn


@hostile
def parent_path(d):
    _index(d, {"w": "../x.safetensors"})
    return "not a plain file name"


@hostile
def absolute_path(d):
    _index(d, {"w": "/etc/passwd"})
    return "not a plain file name"


@hostile
def symlink_out(d):
    outside = d.parent / "outside.safetensors"
    _write_file(outside, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    os.symlink(outside, d / "model-00001-of-00001.safetensors")
    _index(d, {"w": "model-00001-of-00001.safetensors"})
    return "leads outside the checkpoint directory"


@hostile
def truncated_shard(d):
    _write_file(d / "a.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 10)
    _index(d, {"w": "a.safetensors"})
    return "do not fit"


@hostile
def header_longer_than_file(d):
    _write_file(d / "a.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                b"\0" * 16, header_len=10_000)
    _index(d, {"w": "a.safetensors"})
    return "exceeds file size"


@hostile
def absurd_header_length(d):
    _write_file(d / "a.safetensors", {}, b"", header_len=2**62)
    _index(d, {"w": "a.safetensors"})
    return "is absurd"


@hostile
def overlapping_offsets(d):
    _write_file(d / "a.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                      "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16)
    _index(d, {"w": "a.safetensors", "v": "a.safetensors"})
    return "overlap"


@hostile
def out_of_range_offsets(d):
    _write_file(d / "a.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]}}, b"\0" * 16)
    _index(d, {"w": "a.safetensors"})
    return "do not fit"


@hostile
def shape_dtype_mismatch(d):
    _write_file(d / "a.safetensors", {"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    _index(d, {"w": "a.safetensors"})
    return "do not fit"


@hostile
def index_names_a_missing_tensor(d):
    _write_file(d / "a.safetensors", {"v": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    _index(d, {"w": "a.safetensors"})
    return "no tensor 'w'"


@hostile
def missing_shard(d):
    _index(d, {"w": "model-00001-of-00001.safetensors"})
    return "shard file missing"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_damaged_checkpoints_give_a_clear_error(tmp_path, case):
    d = tmp_path / "ck"
    d.mkdir()
    expected = HOSTILE[case](d)
    for load in (lambda: load_state_dict(d), lambda: dist_load({"w": torch.zeros(4)}, d, strict=False)):
        with pytest.raises(CheckpointError, match=expected) as info:
            load()
        assert str(d) in str(info.value) or "outside" in str(info.value)


def _slow_job(path, started, hold):
    """A separate single-process job whose save holds the target for `hold` seconds."""
    import dist_saver.save as save_mod

    real = save_mod.write_share

    def slow(*args):
        started.set()
        time.sleep(hold)
        return real(*args)

    save_mod.write_share = slow
    dist_save(new_state(), path, overwrite=True)


def test_two_concurrent_jobs_saving_into_one_path(tmp_path):
    import multiprocessing as mp

    path = str(tmp_path / "ck")
    dist_save(old_state(), path)
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    first = ctx.Process(target=_slow_job, args=(path, started, 4.0))
    first.start()
    try:
        assert started.wait(60), "the first job never started writing"
        with pytest.raises(SaveError, match=r"another save into .* in progress .*pid \d+"):
            dist_save({"other": torch.ones(3)}, path, overwrite=True)
        assert_bitwise_equal(load_state_dict(path), old_state())  # untouched while the first writes
    finally:
        first.join(60)
    assert first.exitcode == 0
    assert_bitwise_equal(load_state_dict(path), new_state())  # the first job's save, complete
    assert leftovers(path) == []
