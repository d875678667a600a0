"""One process saving CUDA tensors: dist_save against safetensors.save_file and the raw disk.

    python benchmarks/bench_gpu_save.py --size-gb 8 --dir /tmp/bench

Rows, interleaved in one run so the disk's mood is shared: the device-to-host copy alone (pinned),
raw sequential writes of the same bytes from pinned host memory (page cache; +fsync; O_DIRECT
+fsync), safetensors `save_file` of the CUDA tensors (+fsync), dist_save (durable), and an async
dist_save (time it blocks the caller, and until it is done; best of the rounds, so the snapshot
buffers are warm as in a training loop). Ratios are against the best durable raw write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dist_saver import dist_save
from dist_saver.buffers import aligned_empty, as_bytes
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes


CUDA = torch.cuda.is_available()  # without a GPU the script still runs, on CPU tensors (a dry run)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def raw_write(path: str, buf: torch.Tensor, fsync: bool, direct: bool = False) -> float:
    view = as_bytes(buf)[: len(buf) // 4096 * 4096]
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    step = 64 << 20
    for i in range(0, len(view), step):
        os.write(fd, view[i : i + step])
    if fsync:
        os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--dir", default="/tmp/dist_saver_gpu_bench")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> None:
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:  # under torchrun: N processes share the GPU, each saves its part
        dist.init_process_group("gloo")
        if CUDA:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
    os.makedirs(args.dir, exist_ok=True)
    with torch.device("cuda" if CUDA else "cpu"):  # initialise on the GPU: no host copy of the model
        model = TinyLlama(**llama_config_for_bytes(int(args.size_gb * 1e9)))
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    names = list(sd)
    mine = names[rank::world]  # this rank's share for the raw rows
    share = sum(sd[n].numel() * sd[n].element_size() for n in mine)
    host = aligned_empty(share, pinned=True)
    results: dict[str, list[float]] = {}

    def timed(name, fn):
        if multi:
            dist.barrier()
        t0 = time.perf_counter()
        extra = fn()
        mine_s = extra if isinstance(extra, float) else time.perf_counter() - t0
        if multi:
            all_s = [None] * world
            dist.all_gather_object(all_s, mine_s)
            mine_s = max(all_s)
        results.setdefault(name, []).append(mine_s)

    def d2h():
        pos = 0
        for n in mine:
            t = sd[n]
            k = t.numel() * t.element_size()
            host[pos : pos + k].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            pos += k
        sync()

    raw = os.path.join(args.dir, f"raw{rank}.bin")
    st = os.path.join(args.dir, "st")
    out = os.path.join(args.dir, "ds")

    def save_file_row():
        if rank == 0:
            os.makedirs(st, exist_ok=True)
            save_file(sd, os.path.join(st, "model.safetensors"), metadata={"format": "pt"})
            _fsync_dir_files(st)

    def async_row():
        handle = dist_save(sd, out, async_save=True)
        blocking = handle.blocking_seconds
        handle.wait()
        results.setdefault("dist_save async: blocking", []).append(blocking)

    for _ in range(args.repeat):
        sync()
        timed("device-to-host copy (pinned)", d2h)
        timed("raw write, page cache", lambda: raw_write(raw, host, False))
        timed("raw write + fsync", lambda: raw_write(raw, host, True))
        timed("raw O_DIRECT + fsync", lambda: raw_write(raw, host, True, direct=True))
        os.remove(raw)
        timed("safetensors save_file (+fsync)", save_file_row)
        if rank == 0:
            shutil.rmtree(st, ignore_errors=True)
        timed("dist_save (durable)", lambda: dist_save(sd, out))
        if multi:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(out)
        timed("dist_save, direct_io=True", lambda: dist_save(sd, out, direct_io=True))
        if multi:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(out)
        timed("dist_save async: total", async_row)
        if multi:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(out)
    if multi:  # the blocking time of the slowest rank
        blocks = [None] * world
        dist.all_gather_object(blocks, results["dist_save async: blocking"])
        results["dist_save async: blocking"] = [max(b) for b in zip(*blocks)]
    if rank != 0:
        return
    best = {k: min(v) for k, v in results.items()}
    ceiling = min(best["raw write + fsync"], best["raw O_DIRECT + fsync"])
    print(f"\n{torch.cuda.get_device_name() if CUDA else 'CPU (dry run)'}, {nbytes / 1e9:.2f} GB of CUDA bf16 tensors, {world} process(es), "
          f"best of {args.repeat}, torch {torch.__version__} (raw and D2H rows: each process its 1/{world})")
    print(f"{'what':<34} {'s':>7} {'GB/s':>7} {'x best raw':>12}")
    for k, s in best.items():
        print(f"{k:<34} {s:>7.2f} {nbytes / s / 1e9:>7.2f} {ceiling / s:>12.2f}")
    d2h = best["device-to-host copy (pinned)"]  # per process, its share, as the snapshot
    print(f"dist_save vs save_file: {best['safetensors save_file (+fsync)'] / best['dist_save (durable)']:.2f}x; "
          f"async blocking / D2H copy: {best['dist_save async: blocking'] / d2h:.2f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "gpu_save", "world": world, "bytes": nbytes, "best_seconds": best}) + "\n")


if __name__ == "__main__":
    main()
