"""Correct under fire (issue 14, the save side): what every rank reports matches what is on disk,
and every failure names the rank, the tensor or the file."""

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from dist_saver import CheckpointError, DistSaverError, SaveError, dist_save, load_state_dict, verify
from dist_saver import format as fmt
from dist_saver.cli import main as cli
from dist_saver.commit import Target
from dist_saver.errors import CollectiveError, DistSaverWarning

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, leftovers, new_state, old_state


def _fail_on_agree(what_prefix, action):
    """Make this process's Comm.agree (every Comm.step's collective) run action() when it reaches
    the agreement named what_prefix."""
    import dist_saver.comm as comm_mod

    real = comm_mod.Comm.agree

    def agree(self, error, what, *args, **kwargs):
        if what.startswith(what_prefix):
            action()
        return real(self, error, what, *args, **kwargs)

    comm_mod.Comm.agree = agree


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


# 1. A peer lost while preparing: rank 0 already holds the lock and made the staging directory.

def _lost_while_preparing(rank, world, path, how):
    import torch.distributed as dist

    if rank == 1:
        def fail():
            if how == "kill":
                _die()
            raise RuntimeError("injected: rank 1 leaves before the first agreement")
        _fail_on_agree("preparing", fail)
    try:
        dist_save(new_state(), path, overwrite=True, timeout=20)
    except Exception as e:
        if rank == 1:
            return None  # its own injected error; it never reached the agreement
        message, after_failure = str(e), leftovers(path)
        dist.destroy_process_group()  # the group is broken: save again as a process of its own
        dist_save(new_state(), path, overwrite=True)
        return message, after_failure, leftovers(path)
    return "saved", None, None


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_peer_lost_while_preparing_leaves_no_lock_or_staging(tmp_path, how):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    outs = run_ranks(_lost_while_preparing, 2, str(path), how, timeout=90,
                     expect_dead=(1,) if how == "kill" else ())
    message, after_failure, after_resave = outs[0]
    assert re.search(r"rank 0: a collective failed", message), message
    assert after_failure == [] and after_resave == []  # no lock, no staging left by rank 0
    assert_bitwise_equal(load_state_dict(path), new_state())


# 2. A peer dies right after rank 0's publish (or rank 0 right after its own): the checkpoint is
# complete, so the survivors report success, with a warning naming the dead rank.

def _dies_around_the_publish(rank, world, path, when):
    import dist_saver.commit as commit_mod

    staging = Target(path).staging
    if when == "peer after publish" and rank == 1:
        def die_once_published():  # rank 0 renamed the staging directory to path
            deadline = time.monotonic() + 60
            while os.path.exists(staging) and time.monotonic() < deadline:
                time.sleep(0.01)
            _die()
        _fail_on_agree("publishing", die_once_published)
    if when in ("rank 0 after publish", "rank 0 before publish") and rank == 0:
        real = commit_mod.Target.publish

        def publish(self):
            if when == "rank 0 after publish":
                real(self)
            _die()
        commit_mod.Target.publish = publish
    t0 = time.monotonic()
    try:
        result = dist_save(new_state(), path, overwrite=True, timeout=30)
    except DistSaverError as e:
        return "raised", type(e).__name__, str(e), e.stage, time.monotonic() - t0
    return "returned", result.warning, result.total_bytes, time.monotonic() - t0


@pytest.mark.parametrize("when, dead", [("peer after publish", 1), ("rank 0 after publish", 0),
                                        ("rank 0 before publish", 0)])
def test_what_survivors_report_matches_the_disk(tmp_path, when, dead):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    outs = run_ranks(_dies_around_the_publish, 2, str(path), when, timeout=120, expect_dead=(dead,))
    survivor = outs[1 - dead]
    assert survivor is not None and survivor[-1] < 60
    if when == "rank 0 before publish":
        kind, cls, message, stage, _ = survivor
        assert kind == "raised" and cls == CollectiveError.__name__, survivor
        assert stage == f"publishing {path}"  # the step whose agreement broke
        assert re.search(rf"rank 1: a collective failed.*{re.escape(str(path))} was not published", message, re.S)
        assert_bitwise_equal(load_state_dict(path), old_state())
    else:
        kind, warning, total, _ = survivor
        assert kind == "returned", survivor
        assert re.search(rf"checkpoint at {re.escape(str(path))} was published .*rank {dead} failed afterwards",
                         warning), warning
        assert total == sum(t.numel() * t.element_size() for t in new_state().values())
        assert_bitwise_equal(load_state_dict(path), new_state())
        assert verify(path)
    dist_save(new_state(), path, overwrite=True)  # a dead rank 0's lock is stale: taken over
    assert leftovers(path) == []


# 3. A rank that never enters its first save.

def _never_enters(rank, world, path):
    if rank == 1:
        time.sleep(12)  # alive, but never calls dist_save
        return None
    t0 = time.monotonic()
    try:
        dist_save(new_state(), path, timeout=4)
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "saved", "", time.monotonic() - t0


def test_a_rank_that_never_calls_dist_save_is_named(tmp_path):
    outs = run_ranks(_never_enters, 2, str(tmp_path / "ck"), timeout=90)
    cls, message, seconds = outs[0]
    assert cls == CollectiveError.__name__, (cls, message)
    assert re.search(r"rank\(s\) 1 of 2 did not call dist_save within the save's timeout of 4s", message), message
    assert seconds < 15
    assert not (tmp_path / "ck").exists()


# 4. ENOSPC writing the index names the file.

def test_enospc_writing_the_index_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    dist_save(old_state(), path)
    real = fmt.write_durable

    def full_disk(target, data):
        if fmt.INDEX_NAME in os.path.basename(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file name
        return real(target, data)

    monkeypatch.setattr(fmt, "write_durable", full_disk)
    with pytest.raises(SaveError, match=rf"No space left on device: '[^']*{re.escape(fmt.INDEX_NAME)}"):
        dist_save(new_state(), path, overwrite=True)
    assert_bitwise_equal(load_state_dict(path), old_state())
    assert leftovers(path) == []


def test_enospc_or_eio_writing_or_reading_a_shard_names_the_file_and_bytes(tmp_path, monkeypatch):
    from dist_saver.writer import FileOps, using_file_ops

    class FullDisk(FileOps):  # the headers fit, the tensors' bytes do not
        def pwrite(self, fd, view, offset):
            if offset >= fmt.DATA_ALIGN:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file name
            return super().pwrite(fd, view, offset)

    path = tmp_path / "ck"
    with using_file_ops(FullDisk()):
        with pytest.raises(SaveError, match=r"No space left on device|writing bytes \[\d+, \d+\) of .*model-\d{5}-of"
                                            r"-\d{5}\.safetensors") as info:
            dist_save(old_state(), path)
    assert re.search(r"writing bytes \[\d+, \d+\) of \S*model-00001-of-00001\.safetensors", str(info.value)), info.value
    assert not path.exists() and leftovers(path) == []
    dist_save(old_state(), path)

    def eio(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # what the OS says: no file name

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: reading bytes \[\d+, \d+\) "
                                              r"failed: \[Errno 5\] Input/output error"):
        load_state_dict(path)


# 5. The process group destroyed and initialised again in the same processes.

def _save_reinit_save(rank, world, path, init_file):
    import datetime

    import torch.distributed as dist

    first = dist_save(old_state(), path + "-1", timeout=30)
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    second = dist_save(new_state(), path + "-2", timeout=30)  # the same timeout: the old cache key
    return first.total_bytes, second.total_bytes


def test_saves_after_the_process_group_is_initialised_again(tmp_path):
    path = str(tmp_path / "ck")
    outs = run_ranks(_save_reinit_save, 2, path, str(tmp_path / "pg2"), timeout=120)
    assert outs[0] == outs[1]
    assert_bitwise_equal(load_state_dict(path + "-1"), old_state())
    assert_bitwise_equal(load_state_dict(path + "-2"), new_state())


# 10. config.json as save_pretrained writes it, for a model cast after loading.

def test_config_json_is_what_save_pretrained_writes_for_a_cast_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.dtype = torch.bfloat16  # as from_pretrained(..., dtype=torch.bfloat16) leaves it
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).float()  # then trained in fp32
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dist_save(model, tmp_path / "ours")
    assert model.config.dtype == torch.bfloat16  # the model's own config is left alone
    model.save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert ours == theirs, {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                            if ours.get(k) != theirs.get(k)}
    assert ours["dtype"] == "float32" and ours["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert loaded.dtype == torch.float32, transformers.__version__
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items() if k != "lm_head.weight")


# 11. The default progress bar: drawn when the save runs long enough, in GB.

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_progress_bar_draws_for_a_long_save_in_gb(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    import dist_saver.progress as progress_mod
    import dist_saver.save as save_mod

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress_mod, "SHOW_AFTER_S", 0.5)
    sd = {"w": torch.zeros(1_000_000)}  # 4.00 MB (3.81 MiB)
    dist_save(sd, tmp_path / "quick")
    assert terminal.getvalue() == ""  # short saves draw nothing
    real = save_mod.collect

    def slow_collect(*args):  # the time goes before the writes: planning, a big state dict
        time.sleep(0.8)
        return real(*args)

    monkeypatch.setattr(save_mod, "collect", slow_collect)
    dist_save(sd, tmp_path / "slow")
    drawn = terminal.getvalue()
    assert "saving slow: 100%" in drawn and "4.00MB/4.00MB" in drawn, drawn


# 12. The command line.

def test_cli_points_a_shard_file_to_its_checkpoint_directory(tmp_path, capsys):
    path = tmp_path / "ck"
    dist_save(old_state(), path, max_shard_size=20_000)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    for command in ("inspect", "verify"):
        assert cli([command, str(shard)]) == 2
        err = capsys.readouterr().err
        assert f"give the checkpoint directory: dist-saver {command} {path}" in err, err
        assert "None" not in err and "another tool" not in err
    assert cli(["verify", str(shard), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2


def test_cli_help_version_and_sizes(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "dist_saver.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and re.fullmatch(r"dist-saver \d+\.\d+\.\d+\S*\n", out.stdout), out
    for command in ("inspect", "verify", "push"):
        out = subprocess.run([sys.executable, "-m", "dist_saver.cli", command, "--help"], capture_output=True,
                             text=True)
        assert "CHECKPOINT_DIR" in out.stdout and "exit codes: 0" in out.stdout, out.stdout
    path = tmp_path / "ck"
    result = dist_save({"a": torch.ones(100), "b": torch.zeros(10, dtype=torch.int64)}, path)
    assert cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "0.000 GB" not in text and "480 B of tensor data" in text and "rank None" not in text, text
    assert cli(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensor_bytes"] == result.total_bytes == 480
    assert info["file_bytes"] == sum(f.size for f in result.files) == sum(f.stat().st_size for f in
                                                                          path.glob("*.safetensors"))


# 15. Views that partly overlap one storage.

def test_overlapping_views_warn_naming_both_and_are_saved_in_full(tmp_path):
    fused = torch.arange(48.0).reshape(12, 4)
    sd = {"qkv.weight": fused, "q.weight": fused[:4], "tied": fused}
    with pytest.warns(DistSaverWarning, match=r"rank 0: tensors 'qkv.weight' and 'q.weight' overlap in memory"):
        dist_save(sd, tmp_path / "a")
    back = load_state_dict(tmp_path / "a")
    assert torch.equal(back["qkv.weight"], fused) and torch.equal(back["q.weight"], fused[:4])
    assert back["tied"] is back["qkv.weight"]  # an identical view stays an alias, without a warning
    # disjoint views of one storage (column halves) share no byte: saved as they are, silently
    other = torch.arange(48.0).reshape(4, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DistSaverWarning)
        dist_save({"left": other[:, :6], "right": other[:, 6:]}, tmp_path / "b")
    assert torch.equal(load_state_dict(tmp_path / "b")["right"], other[:, 6:])

