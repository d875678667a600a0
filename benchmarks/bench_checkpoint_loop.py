"""Checkpoints at intervals (issue 19): what a save costs a training loop, against DCP, in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_checkpoint_loop.py --dir /dev/shm

Three parts, each interleaved A/B round by round, medians (times are the slowest rank's):
1. Fixed cost of a repeated save of a small model (100 tensors, 13 MB, replicated on every rank,
   the same structure every time): dist_save sync (its plan reused after the first) and dcp.save;
   the blocking part of an async save: dist_save(async_save=True) and dcp.async_save, each waited
   for before the next.
2. Async blocking of a larger model (--size-gb, FSDP2 bf16): how long dist_save(async_save=True)
   holds the caller, against the pure host copy of this rank's share (the snapshot's floor:
   copying the tensors this rank writes into reused host buffers), and dcp.async_save.
3. A training-like loop (FSDP2, AdamW, a few matmuls of work per step) run --steps steps with no
   checkpoints, with CheckpointManager(save_every=--every, async_save=True), and with
   dcp.async_save of the same model and optimizer state every --every steps (on a gloo group of its own: on the default group its
   background collectives interleave with the loop's and deadlock, as its users report): the mean step time of all steps, and of the steps that
   ran while a save was pending, against the loop without checkpoints.
Every saver writes over its own directories (DCP's FileSystemWriter overwrites; the loop keeps two
of each, as the manager's keep=2): the checkpoints live in --dir, which is memory on tmpfs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from dist_saver import CheckpointManager, dist_save
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes, shard_llama

from harness import start_ranks  # noqa: E402  (same directory)


def slowest(seconds: float) -> float:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, seconds)
    return max(out)


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - t0)


def small_model() -> dict[str, torch.Tensor]:
    """100 tensors, 13 MB (bf16)."""
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i // 10}.w{i % 10}": torch.randn(256, 256, generator=gen).to(torch.bfloat16)
            for i in range(100)}


def part_fixed_cost(root: str, rounds: int) -> dict:
    import torch.distributed.checkpoint as dcp

    sd = small_model()
    rows = {
        "dist_save": lambda k: dist_save(sd, os.path.join(root, "ours"), overwrite=True),
        "dcp.save": lambda k: dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(root, "dcp"))),
        "dist_save async (blocking)": lambda k: _async_ours(sd, os.path.join(root, "ours-async")),
        "dcp.async_save (blocking)": lambda k: _async_dcp(sd, os.path.join(root, "dcp-async")),
    }
    return interleave(rows, rounds)


_pending = {}
_groups = []


def dcp_group():
    """dcp.async_save's own gloo group: on the default group its background collectives interleave
    with the foreground's (this benchmark's dcp.save and timing gathers) and deadlock."""
    if not _groups:
        _groups.append(dist.new_group(backend="gloo"))
    return _groups[0]


def _async_ours(sd, path):
    if "ours" in _pending:
        _pending.pop("ours").wait()
    _pending["ours"] = dist_save(sd, path, overwrite=True, async_save=True)


def _async_dcp(sd, path):
    import torch.distributed.checkpoint as dcp

    if "dcp" in _pending:
        _pending.pop("dcp").result()
    _pending["dcp"] = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(path), process_group=dcp_group())


def settle() -> None:
    """Finish the pending async saves (untimed), so no background writer competes for the cores
    with the next row."""
    for key in list(_pending):
        p = _pending.pop(key)
        p.wait() if hasattr(p, "wait") else p.result()


def interleave(rows: dict, rounds: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows.items())
    for k in range(rounds):
        for name, fn in order[k % len(order):] + order[:k % len(order)]:
            settle()
            times[name].append(timed(lambda: fn(k)))
    settle()
    dist.barrier()
    return {name: statistics.median(v[1:] if len(v) > 2 else v) for name, v in times.items()}  # first: warm-up


def sharded_model(size_gb: float, world: int) -> torch.nn.Module:
    cfg = llama_config_for_bytes(int(size_gb * 1e9))
    with torch.device("meta"):
        model = TinyLlama(**cfg)
    shard_llama(model, "fsdp", world)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    return model


def part_async_blocking(root: str, size_gb: float, world: int, rounds: int) -> dict:
    model = sharded_model(size_gb, world)
    locals_ = [p.to_local() for p in model.state_dict().values()]
    copies = [torch.empty_like(t) for t in locals_]  # reused, as the snapshot's buffers are
    for c, t in zip(copies, locals_):
        c.copy_(t)

    def host_copy(k):
        for c, t in zip(copies, locals_):
            c.copy_(t)

    rows = {
        "host copy of this rank's share": host_copy,
        "dist_save async (blocking)": lambda k: _async_ours(model, os.path.join(root, "big")),
        "dcp.async_save (blocking)": lambda k: _async_dcp(model.state_dict(), os.path.join(root, "big-dcp")),
    }
    return interleave(rows, rounds)


def part_training_loop(root: str, size_gb: float, world: int, steps: int, every: int) -> dict:
    import torch.distributed.checkpoint as dcp

    model = sharded_model(size_gb, world)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(512, 512)

    grads = [torch.full_like(p, 1e-3) for p in params]  # made once: fresh memory is slow on this VM

    def step():
        for _ in range(8):  # compute of the training step (no FSDP forward: the time is in the loop's hands)
            torch.mm(x, x)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def loop(mode: str) -> tuple[list[float], list[bool]]:
        times, pending_flags = [], []
        manager = CheckpointManager(os.path.join(root, f"run-{mode}"), save_every=every, keep=2) \
            if mode == "manager" else None
        handle = None
        for s in range(1, steps + 1):
            t0 = time.perf_counter()
            step()
            pend = False
            if mode == "manager":
                pend = manager._pending is not None and not manager._pending[1].done()
                manager.save(s, model, optimizer=opt, train_state={"step": s})
            elif mode == "dcp" and s % every == 0:
                if handle is not None:
                    handle.result()
                from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                handle = dcp.async_save(state, process_group=dcp_group(),
                                        storage_writer=dcp.FileSystemWriter(os.path.join(root, f"dcp-{s // every % 2}")))
            elif mode == "dcp":
                pend = handle is not None and not handle.done()
            times.append(slowest(time.perf_counter() - t0))
            pending_flags.append(pend)
        if manager is not None:
            manager.close()
        if handle is not None:
            handle.result()
        return times, pending_flags

    out = {}
    for mode in ("none", "manager", "dcp", "none", "manager", "dcp"):  # interleaved twice
        times, flags = loop(mode)
        overlapped = [t for t, f in zip(times, flags) if f]
        out.setdefault(mode, []).append((statistics.mean(times[1:]), statistics.mean(overlapped) if overlapped else None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 2")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    rank, world = start_ranks("cpu")
    root = [tempfile.mkdtemp(prefix="dist_saver_loop_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    root = root[0]
    fixed = part_fixed_cost(root, args.rounds) if 1 in parts else None
    blocking = part_async_blocking(root, args.size_gb, world, args.rounds) if 2 in parts else None
    loop = part_training_loop(root, args.size_gb / 4, world, args.steps, args.every) if 3 in parts else None
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\n{world} ranks, dir {args.dir or '/tmp'}, torch {torch.__version__}, medians")
        if fixed:
            print("1. small model (100 tensors, 13 MB), repeated save, fixed cost:")
            for name, s in fixed.items():
                print(f"   {name:<30} {s * 1e3:8.1f} ms")
            print(f"   dist_save / dcp.save: {fixed['dist_save'] / fixed['dcp.save']:.2f}x the time; async blocking "
                  f"{fixed['dist_save async (blocking)'] / fixed['dcp.async_save (blocking)']:.2f}x dcp.async_save's")
        if blocking:
            print(f"2. async blocking, FSDP2 {args.size_gb:g} GB:")
            for name, s in blocking.items():
                print(f"   {name:<34} {s * 1e3:8.1f} ms")
            floor = blocking["host copy of this rank's share"]
            print(f"   dist_save async blocking = {blocking['dist_save async (blocking)'] / floor:.2f}x the host copy "
                  f"(target <= 1.3x)")
        if loop:
            print(f"3. training loop ({args.steps} steps, a save every {args.every}, FSDP2 {args.size_gb / 4:g} GB + AdamW):")
            base = min(m for m, _ in loop["none"])
            for mode, runs in loop.items():
                mean = min(m for m, _ in runs)
                over = [o for _, o in runs if o is not None]
                extra = f", steps with a save pending {min(over) * 1e3:.1f} ms ({min(over) / base:.2f}x)" if over else ""
                print(f"   {mode:<8} mean step {mean * 1e3:.1f} ms ({mean / base:.2f}x){extra}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "checkpoint_loop", "world": world, "dir": args.dir, "fixed": fixed,
                                    "blocking": blocking, "loop": loop}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
