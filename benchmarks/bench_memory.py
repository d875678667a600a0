"""Peak extra host memory per rank while saving an FSDP2-sharded Llama-shaped model.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_memory.py --size-gb 4
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_memory.py --size-gb 4

The model is built on the meta device and only each rank's shard is materialised, so a rank never
holds more than its share. Printed per rank: its share, the bucket budget, peak RSS during the save
over the RSS just before it, and that extra as a ratio of the bucket and of the share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dist_saver import dist_save, format as fmt
from dist_saver.memory import PeakRSS
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes


def build_fsdp_model(size_gb: float, world: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = TinyLlama(**llama_config_for_bytes(int(size_gb * 1e9)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.copy_(torch.randint(-1000, 1000, local.shape, generator=gen).to(local.dtype))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--bucket", default="16MiB")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="append the rows as JSON lines to this file")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_fsdp_model(args.size_gb, world)
    share = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    bucket = fmt.parse_size(args.bucket)

    root = args.dir or tempfile.mkdtemp(prefix="dist_saver_bench_") if rank == 0 else None
    root = [root]
    dist.broadcast_object_list(root, src=0)
    path = os.path.join(root[0], "ckpt")
    dist.barrier()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        result = dist_save(model, path, bucket_size=bucket)
    seconds = time.perf_counter() - t0
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "share": share, "extra": mem.extra, "base": mem.base})
    if rank == 0:
        print(f"\nFSDP2 model {total / 1e9:.2f} GB on {world} ranks, bucket {bucket / 2**20:.0f} MiB, "
              f"save {seconds:.2f}s ({total / seconds / 1e9:.2f} GB/s, {len(result.files)} files)")
        print(f"{'rank':>4} {'share GiB':>10} {'RSS before GiB':>15} {'peak extra MiB':>15} "
              f"{'extra/bucket':>13} {'extra/share':>12}")
        for r in rows:
            print(f"{r['rank']:>4} {r['share'] / 2**30:>10.2f} {r['base'] / 2**30:>15.2f} "
                  f"{r['extra'] / 2**20:>15.1f} {r['extra'] / bucket:>13.2f} {r['extra'] / r['share']:>12.3f}")
        if args.json:
            with open(args.json, "a") as f:
                for r in rows:
                    f.write(json.dumps({"bench": "memory", "world": world, "model_bytes": total,
                                        "bucket": bucket, "seconds": seconds, **r}) + "\n")
        if not args.dir:
            shutil.rmtree(root[0], ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
