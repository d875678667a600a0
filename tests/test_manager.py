"""CheckpointManager (issue 19): checkpoints at intervals that a crashed and restarted job resumes from.

One process (no process group) for the rules; a child process killed with SIGKILL at random instants
of its async saves and rotations; and a real torchrun --max-restarts 1 job (2 ranks, FSDP2, AdamW,
async saves) in which a rank dies mid-training and the job still ends bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_saver import CheckpointError, CheckpointManager, DistSaverWarning, dist_save, load_state_dict
from dist_saver import format as fmt

from .helpers import assert_bitwise_equal, leftovers
from .test_restarts import _events, _torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(step: float) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(step)
    return m


def _dirs(root) -> list[str]:
    return sorted(os.listdir(root))


@pytest.mark.parametrize("async_save", [False, True])
def test_interval_rotation_keep_every_and_the_trainer_naming(tmp_path, async_save):
    root = tmp_path / "run"
    ckpt = CheckpointManager(root, save_every=2, keep=2, keep_every=4, async_save=async_save)
    assert ckpt.restore(_model(0)) is None and ckpt.latest_step() is None  # nothing saved yet
    for step in range(1, 11):
        out = ckpt.save(step, _model(step), train_state={"step": step})
        assert (out is None) == (step % 2 == 1), step  # off the interval: nothing written
    ckpt.close()
    # the newest 2 (8, 10) and every 4th (4, 8); 2 and 6 rotated away after newer ones were published
    assert _dirs(root) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    assert ckpt.all_steps() == [4, 8, 10] and ckpt.latest_step() == 10
    assert all(leftovers(root / d) == [] for d in _dirs(root))
    transformers = pytest.importorskip("transformers")
    assert transformers.trainer_utils.get_last_checkpoint(str(root)) == str(root / "checkpoint-10")
    target = _model(-1)
    res = CheckpointManager(root, save_every=2).restore(target)
    assert res.train_state == {"step": 10} and all(bool((p == 10).all()) for p in target.parameters())
    # force saves off the interval; a given step restores that one
    ckpt.save(11, _model(11), force=True)
    ckpt.close()
    assert ckpt.latest_step() == 11
    assert CheckpointManager(root, save_every=2).restore(target, step=8).train_state == {"step": 8}
    with pytest.raises(CheckpointError, match="checkpoint-9: cannot be restored"):
        CheckpointManager(root, save_every=2).restore(target, step=9)


def test_train_state_and_tensors_are_taken_at_the_call_of_an_async_save(tmp_path):
    state = {"step": 1, "seen": [1, 2]}
    model = _model(1)
    handle = dist_save(model, tmp_path / "ck", train_state=state, async_save=True)
    state["step"] = 2  # the training loop goes on before the save is written
    state["seen"].append(3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2)
    handle.wait()
    with open(tmp_path / "ck" / fmt.TRAIN_STATE_NAME) as f:
        assert json.load(f)["train_state"] == {"step": 1, "seen": [1, 2]}
    assert all(bool((t == 1).all()) for t in load_state_dict(tmp_path / "ck").values())


def _truncate(path):
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) - 3)


def _flip(path):
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("damage, when", [(_truncate, "before a byte is read"), (_flip, "while it is read")],
                         ids=["truncated", "bit flipped"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, when):
    root = tmp_path / "run"
    ckpt = CheckpointManager(root, save_every=1, keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _model(step), train_state={"step": step})
    damage(str(root / "checkpoint-3"))
    target = _model(-1)
    with pytest.warns(DistSaverWarning, match=r"checkpoint-3: skipped"):
        res = CheckpointManager(root, save_every=1).restore(target)
    assert res.train_state == {"step": 2} and all(bool((p == 2).all()) for p in target.parameters())
    if damage is _truncate:  # what a load checks before reading tensor bytes, latest_step checks too
        assert ckpt.latest_step() == 2
        # saving step 3 again moves the incomplete directory aside (kept for inspection)
        with pytest.warns(DistSaverWarning, match="moved to"):
            ckpt.save(3, _model(3))
        assert "checkpoint-3.damaged" in _dirs(root)
    else:  # complete, if damaged: replaced like any checkpoint of ours
        ckpt.save(3, _model(3))
    assert ckpt.latest_step() == 3 and CheckpointManager(root, save_every=1).restore(target).train_state is None


def test_when_every_checkpoint_fails_while_read_restore_raises_instead_of_starting_afresh(tmp_path):
    root = tmp_path / "run"
    ckpt = CheckpointManager(root, save_every=1, async_save=False)
    ckpt.save(1, _model(1))
    _flip(str(root / "checkpoint-1"))
    with pytest.warns(DistSaverWarning), pytest.raises(CheckpointError, match="could be restored.*no longer as it was"):
        CheckpointManager(root, save_every=1).restore(_model(-1))


def test_a_dead_jobs_leftovers_are_swept_at_the_start(tmp_path):
    root = tmp_path / "run"
    ckpt = CheckpointManager(root, save_every=1, async_save=False)
    ckpt.save(1, _model(1))
    os.makedirs(root / fmt.staging_dir_name("checkpoint-2"))  # a save that died writing step 2
    os.makedirs(root / fmt.deleting_dir_name("checkpoint-0"))  # a rotation that died deleting
    with open(root / fmt.lock_file_name("checkpoint-2"), "w") as f:  # its lock, held by a dead pid
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345, "since": 0}, f)
    res = CheckpointManager(root, save_every=1).restore(_model(-1))
    assert res is not None and _dirs(root) == ["checkpoint-1"]


# ---------------------------------------------------------------------------------------------------
# kill -9 at random instants

_CHILD = """
import os, sys, torch
sys.path.insert(0, {root!r})
from dist_saver import CheckpointManager
from tests.test_manager import _model
ckpt = CheckpointManager({run!r}, save_every=1, keep=2, async_save=True)
res = ckpt.restore(_model(-1))
step = res.train_state["step"] if res is not None else 0
print("resumed", step, flush=True)
while True:
    step += 1
    ckpt.save(step, _model(step), train_state={{"step": step}})
"""


def test_kill_9_at_random_instants_of_async_saves_and_rotations_never_loses_the_newest_complete(tmp_path):
    run = tmp_path / "run"
    rng = random.Random(int(os.environ.get("DIST_SAVER_KILL_SEED", 19)))
    code = _CHILD.format(root=ROOT, run=str(run))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    resumed = []
    for kill in range(int(os.environ.get("DIST_SAVER_KILLS", 8))):  # more for a stress run
        before = CheckpointManager(run, save_every=1).latest_step()
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()  # "resumed N": it restored the newest complete checkpoint
        assert line.startswith("resumed"), line
        resumed.append(int(line.split()[1]))
        assert resumed[-1] == (before or 0), (kill, resumed, before)
        time.sleep(rng.uniform(0.05, 1.5))  # somewhere in a save, a publish or a rotation
        assert child.poll() is None, (kill, "the job died of an error of its own, not of the kill")
        child.send_signal(signal.SIGKILL)
        child.wait()
        ckpt = CheckpointManager(run, save_every=1)
        latest = ckpt.latest_step()
        if latest is None:
            continue
        # what latest_step names loads, and holds that step's weights
        target = _model(-1)
        res = ckpt.restore(target)
        assert res.train_state["step"] == latest
        assert all(bool((p == latest).all()) for p in target.parameters()), kill
    assert max(resumed) > 0 and resumed == sorted(resumed), resumed  # progress survived every kill
    CheckpointManager(run, save_every=1).restore(_model(-1))  # sweeps what the last kill left
    assert [d for d in _dirs(run) if not d.startswith("checkpoint-")] == [], _dirs(run)


# ---------------------------------------------------------------------------------------------------
# a real torchrun job


def test_a_torchrun_job_with_the_manager_survives_a_dead_rank_and_ends_bit_identical(tmp_path):
    ref = _torchrun(tmp_path / "ref", tmp_path / "ref-out", "", 0, manager=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # rank 1 dies before step 11: the async save of step 9 may still be in flight, that of 6 is
    # published (the save of 9 waited for it)
    run = _torchrun(tmp_path / "job", tmp_path / "job-out", "0:1:train:11", 1, manager=True)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [(e["attempt"], e["event"], e["step"]) for e in _events(tmp_path / "job-out")]
    loaded = [s for a, e, s in seen if e == "loaded"]
    assert loaded in ([6], [9]) and seen[-1] == (1, "done", 15), seen
    assert_bitwise_equal(torch.load(tmp_path / "job-out" / "final.pt"), torch.load(tmp_path / "ref-out" / "final.pt"))
    assert _dirs(tmp_path / "job") == ["checkpoint-12", "checkpoint-15"]  # keep=2, nothing hidden left
