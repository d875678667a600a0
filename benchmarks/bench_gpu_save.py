"""One process saving CUDA tensors: dist_save against safetensors.save_file and the raw disk.

    python benchmarks/bench_gpu_save.py --size-gb 8 --dir /tmp/bench

Rows, interleaved in one run so the disk's mood is shared: raw sequential write of the same bytes
from pinned host memory (page cache, +fsync), host-to-disk copy through pageable memory, the
device-to-host copy alone (pinned), safetensors `save_file` of the CUDA tensors (+fsync), and
dist_save (durable). Ratios are against the best durable raw write measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file

from dist_saver import dist_save
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes


def _fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def raw_write(path: str, buf: torch.Tensor, fsync: bool) -> float:
    view = memoryview(buf.numpy()).cast("B")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
    os.makedirs(args.dir, exist_ok=True)
    with torch.device("cuda"):  # initialise on the GPU: no host copy of the model
        model = TinyLlama(**llama_config_for_bytes(int(args.size_gb * 1e9)))
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    results: dict[str, list[float]] = {}

    def record(name, seconds):
        results.setdefault(name, []).append(seconds)

    for _ in range(args.repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pos = 0
        for t in sd.values():
            n = t.numel() * t.element_size()
            host[pos : pos + n].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            pos += n
        torch.cuda.synchronize()
        record("device-to-host copy (pinned)", time.perf_counter() - t0)
        record("raw write, page cache", raw_write(os.path.join(args.dir, "raw.bin"), host, False))
        record("raw write + fsync", raw_write(os.path.join(args.dir, "raw.bin"), host, True))
        os.remove(os.path.join(args.dir, "raw.bin"))

        out = os.path.join(args.dir, "st")
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        _fsync_dir_files(out)
        record("safetensors save_file (+fsync)", time.perf_counter() - t0)
        shutil.rmtree(out)

        out = os.path.join(args.dir, "ds")
        t0 = time.perf_counter()
        dist_save(sd, out)
        record("dist_save (durable)", time.perf_counter() - t0)
        shutil.rmtree(out)

    best = {k: min(v) for k, v in results.items()}
    ceiling = best["raw write + fsync"]
    print(f"\n{torch.cuda.get_device_name()}, {nbytes / 1e9:.2f} GB of CUDA bf16 tensors, "
          f"best of {args.repeat}, torch {torch.__version__}")
    print(f"{'what':<34} {'s':>7} {'GB/s':>7} {'x raw fsync':>12}")
    for k, s in best.items():
        print(f"{k:<34} {s:>7.2f} {nbytes / s / 1e9:>7.2f} {ceiling / s:>12.2f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "gpu_save", "bytes": nbytes, "best_seconds": best}) + "\n")


if __name__ == "__main__":
    main()
