"""A training job for `torchrun --max-restarts N` (tests/test_restarts.py): FSDP2 + AdamW on the
tiny Llama of tests/test_resume.py, a checkpoint every --every steps (async and sync saves in turn),
and faults injected by attempt: a rank that dies (os._exit) in the middle of a training step or in
the middle of writing a save. torchrun then restarts every worker; each attempt resumes from the
newest complete checkpoint under ROOT, so the job must end with the weights of a run that never
failed.

    torchrun --standalone --nproc-per-node 2 --max-restarts 2 tests/restart_job.py ROOT OUT \\
        --faults 0:1:train:8,1:0:save:12

--faults: ATTEMPT:RANK:KIND:STEP,... with KIND train (dies before the step's optimizer step) or save
(dies in its first write of that step's save, on the writer thread for an async save).
--manager: checkpoints through dist_saver.CheckpointManager (save_every, keep, restore) instead of
dist_save / dist_load by hand.

Rank 0 appends one JSON line per event to OUT/events.jsonl ({"attempt", "event", "step", ...}) and
writes the final full weights to OUT/final.pt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_saver import dist_load, dist_save  # noqa: E402
from dist_saver import format as fmt  # noqa: E402
from dist_saver.writer import FileOps, using_file_ops  # noqa: E402
from tests.test_resume import build, full_weights, make_optimizer, train  # noqa: E402


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(17)


class _DyingOps(FileOps):
    """Dies in the first write of tensor bytes (the files exist, their data does not)."""

    def pwrite(self, fd, view, offset):
        _die()


_held = []  # the fault's context manager, kept alive (its exit would put the real FileOps back)


def _newest(root: str) -> str | None:
    """The newest checkpoint-<step> whose index was published (the publish is atomic)."""
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(
                os.path.join(root, name, fmt.INDEX_NAME)):
            steps.append(int(name[11:]))
    return os.path.join(root, f"checkpoint-{max(steps)}") if steps else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--faults", default="")
    p.add_argument("--manager", action="store_true")
    args = p.parse_args()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = {}
    for f in filter(None, args.faults.split(",")):
        a, r, kind, step = f.split(":")
        faults[(int(a), int(r), kind, int(step))] = True

    # torch's own init_process_group has the same race as any group made on torchrun's shared store
    # (PyTorch issue 135712: a rank that connects reads a dead attempt's address of the rank it
    # connects to if it reads it first); rank 0 writing first sidesteps it. It is torch's to fix,
    # and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 avoids it; this job keeps the shared store, so that
    # dist_saver's own groups and keys face it.
    time.sleep(0.5 * int(os.environ.get("RANK", "0")))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    def event(**kw):
        if rank == 0:
            with open(os.path.join(args.out, "events.jsonl"), "a") as f:
                f.write(json.dumps({"attempt": attempt, **kw}) + "\n")

    model = build("fsdp", dist.get_world_size())
    opt, sched = make_optimizer(model)
    start = 0
    manager = None
    if args.manager:
        from dist_saver import CheckpointManager

        manager = CheckpointManager(args.root, save_every=args.every, keep=args.keep, async_save=True, timeout=60)
        res = manager.restore(model, optimizer=opt)
    else:
        newest = _newest(args.root)
        res = dist_load(model, newest, optimizer=opt, timeout=60) if newest else None
    if res is not None:
        sched.load_state_dict(res.train_state["sched"])
        start = res.train_state["step"]
        event(event="loaded", step=start)

    pending = None
    for step in range(start + 1, args.steps + 1):
        if faults.get((attempt, rank, "train", step)):
            _die()
        train(model, opt, sched, "fsdp", [step])
        state = {"step": step, "sched": sched.state_dict()}
        if manager is None and step % args.every == 0 and pending is not None:
            pending.wait()  # before a fault goes in: it is meant for this step's save, not the last one's
            pending = None
        if faults.get((attempt, rank, "save", step)):
            _held.append(using_file_ops(_DyingOps()))  # for this save's writer, whichever thread makes it
            _held[-1].__enter__()
        if manager is not None:
            out = manager.save(step, model, optimizer=opt, train_state=state)
            if out is not None:
                event(event="saved", step=step, kind="async")
            continue
        if step % args.every == 0:
            asynchronous = (step // args.every) % 2 == 1
            out = dist_save(model, os.path.join(args.root, f"checkpoint-{step}"), optimizer=opt, train_state=state,
                            async_save=asynchronous, timeout=60)
            pending = out if asynchronous else None
            event(event="saved", step=step, kind="async" if asynchronous else "sync")
    if manager is not None:
        manager.close()
    elif pending is not None:
        pending.wait()
    weights = full_weights(model)  # collective
    if rank == 0:
        torch.save(weights, os.path.join(args.out, "final.pt"))
    event(event="done", step=args.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
