"""Run a function on N real processes joined by a gloo process group (CPU), with a timeout."""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(AssertionError):
    pass


def attempt(fn, *args, **kwargs) -> tuple[bool, object]:
    """(True, fn's value) or (False, its traceback): a worker reports a failure instead of dying
    with it, so the test names the rank and scenario."""
    try:
        return True, fn(*args, **kwargs)
    except BaseException:
        return False, traceback.format_exc()


# A world group that carries no host tensors, as NCCL's in a GPU job: a gloo backend registered for
# the "cuda" device only, so any collective of CPU tensors on the world group fails as under NCCL.
CUDA_ONLY = "cudaonlygloo"


def _cuda_only_gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _init_and_run(fn, rank, world_size, init_file, args, kwargs):
    backend = kwargs.pop("world_backend", "gloo")
    if backend == CUDA_ONLY:  # a fresh process: registered once
        dist.Backend.register_backend(CUDA_ONLY, _cuda_only_gloo, devices=["cuda"])
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    return fn(rank, world_size, *args, **kwargs)


def _entry(fn, rank, world_size, init_file, results, args, kwargs):
    torch.set_num_threads(1)  # N processes share 2 cores
    try:
        results.put((rank, *attempt(_init_and_run, fn, rank, world_size, init_file, args, kwargs)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120, expect_dead=(), **kwargs) -> list:
    """fn(rank, world_size, *args, **kwargs) on every rank; its return values, by rank.
    world_backend= (a keyword, not passed to fn): the world group's backend, "gloo" or CUDA_ONLY.

    Raises RankFailed with every failing rank's traceback, or if any rank is still running
    after `timeout` seconds (then all are killed): a hang is a failure, never a stuck suite.
    Ranks in expect_dead may die without reporting (fault-injection tests); theirs is None.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="dist_saver_pg_")
    os.close(fd)
    os.remove(init_file)  # the file store creates it
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, init_file, results, args, kwargs), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, tuple[bool, object]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(outs) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
                outs[rank] = (ok, out)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if os.path.exists(init_file):
            os.remove(init_file)
    failed = [f"rank {r}:\n{o}" for r, (ok, o) in sorted(outs.items()) if not ok]
    missing = [r for r in range(world_size) if r not in outs and r not in expect_dead]
    if missing:
        failed.append(f"ranks {missing} returned nothing within {timeout}s (hung or died)")
    if failed:
        raise RankFailed("\n".join(failed))
    return [outs[r][1] if r in outs else None for r in range(world_size)]
