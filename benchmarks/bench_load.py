"""Load throughput: dist_load (full, 1/N shard, resharding) against safetensors and DCP's HF reader.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_load.py --size-gb 4

A Llama-shaped bf16 checkpoint is saved once (dist_save, replicated); then, round by round with
the page cache dropped before each row (posix_fadvise DONTNEED, so reads hit the disk):
  dist_load, full model on every rank          vs  safetensors.torch.load_file of every file
  dist_load into FSDP2 (each rank its 1/N)     vs  DCP HuggingFaceStorageReader into the same FSDP2 model
  dist_load into TP (a resharding load)
Columns: seconds (slowest rank), GB/s of bytes the rank needed, bytes read from disk (all ranks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from dist_saver import dist_load, dist_save

from bench_save import build_model  # noqa: E402  (same directory)
from harness import evict, read_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    root = [tempfile.mkdtemp(prefix="dist_saver_load_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    path = os.path.join(root[0], "ckpt")

    source = build_model("replicated", args.size_gb, world)
    total = sum(p.numel() * p.element_size() for p in source.parameters())
    dist_save(source, path, max_shard_size="1GB")
    del source
    models = {layout: build_model(layout, args.size_gb, world) for layout in ("replicated", "fsdp", "tp")}

    def needed(model) -> int:
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                   for p in model.parameters())

    def load_file_row():
        from safetensors.torch import load_file

        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                sd = load_file(os.path.join(path, name))
                for t in sd.values():  # touch every byte, as a copy into a model would
                    t.view(-1)[:: 4096 // t.element_size() or 1].sum()

    def dcp_row():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(models["fsdp"].state_dict(), storage_reader=HuggingFaceStorageReader(path))

    rows = {
        "dist_load, full model per rank": (lambda: dist_load(models["replicated"], path), needed(models["replicated"])),
        "safetensors load_file, every file": (load_file_row, total),
        "dist_load into FSDP2 (1/N)": (lambda: dist_load(models["fsdp"], path), needed(models["fsdp"])),
        "DCP HF reader into FSDP2": (dcp_row, needed(models["fsdp"])),
        "dist_load into TP (resharding)": (lambda: dist_load(models["tp"], path), needed(models["tp"])),
    }
    results: dict[str, list] = {}
    for _ in range(args.repeat):
        for name, (fn, need) in rows.items():
            dist.barrier()
            if rank == 0:
                evict([path])
            dist.barrier()
            before = read_bytes()
            t0 = time.perf_counter()
            try:
                fn()
                ok = True
            except Exception as e:
                ok = False
                if rank == 0:
                    print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            seconds = time.perf_counter() - t0
            stats = [None] * world
            dist.all_gather_object(stats, (seconds, read_bytes() - before, ok))
            if all(s[2] for s in stats):
                results.setdefault(name, []).append((max(s[0] for s in stats), sum(s[1] for s in stats), need))
    if rank == 0:
        print(f"\nload of a {total / 1e9:.2f} GB bf16 checkpoint, {world} ranks, cold page cache, best of "
              f"{args.repeat} (torch {torch.__version__})")
        print(f"{'loader':<36} {'s':>7} {'GB/s per rank':>14} {'disk GB (all ranks)':>20}")
        for name, runs in results.items():
            s, disk, need = min(runs)
            print(f"{name:<36} {s:>7.2f} {need / s / 1e9:>14.2f} {disk / 1e9:>20.2f}")
        shutil.rmtree(root[0], ignore_errors=True)
        if args.json:
            import json

            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "load", "world": world, "model_bytes": total,
                                    "rows": {k: [{"seconds": a, "disk_bytes": b, "needed_bytes": c}
                                                 for a, b, c in v] for k, v in results.items()}}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
