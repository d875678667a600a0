"""Cost per tensor (issue 20): mixture-of-experts-shaped state dicts of many small tensors.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_tensor_count.py --counts 1000,10000,50000,100000 --dir /dev/shm
    python benchmarks/bench_tensor_count.py --plan-only          # pure planning at 1024 ranks

For each N: about --total-mb of bf16 in N tensors of 8 KB to 1 MB (a few large, most small, as
experts and their scales; names like model.layers.L.mlp.experts.E.w1), the same on every rank.
Rows, interleaved round by round, best of --repeat, slowest rank's time:
  dist_save          (every rank holds it all; each writes its share), the first save of the
                     structure (plan made) and a repeated one (plan reused, only digests gathered);
                     and the same tensors FSDP2-sharded (Shard(0) DTensors, repeated): every rank
                     writes its band of every tensor in place, one checksummed range per band
  save_file          safetensors.torch.save_file of everything, one process (rank 0)
  DCP                dcp.save(FileSystemWriter), every rank
  dist_load          every rank loads everything; and each rank its FSDP2 Shard(0) piece (DTensors)
  load_file          safetensors.torch.load_file of the one file, one process (rank 0); warm page
                     cache, and safetensors may leave large tensors mapped rather than read
                     (it is fastest where tensors are few and large)
--plan-only: merge_metadata + make_plan for 1024 ranks x 100k tensors, replicated (DDP) and
FSDP2-sharded (Shard(0)); the bytes of one rank's pickled metadata (what the gather sends).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import tempfile
import time

import torch
import torch.distributed as dist


def moe_state_dict(n: int, total_mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    # sizes log-uniform in [8 KB, 1 MB], scaled so the total is about total_mb
    raw = [2 ** rng.uniform(13, 20) for _ in range(n)]
    scale = total_mb * 1e6 / sum(raw)
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for i, r in enumerate(raw):
        elems = max(64, int(r * scale) // 2 // 64 * 64)
        name = f"model.layers.{i // 768}.mlp.experts.{(i // 3) % 256}.w{i % 3}"
        out[name] = torch.randn(elems // 64, 64, generator=gen).to(torch.bfloat16)
    return out


def slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, seconds)
    return max(out)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def timed(fn) -> float:
    barrier()
    t0 = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - t0)


def run_counts(args) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from dist_saver import dist_load, dist_save

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    root = [tempfile.mkdtemp(prefix="dist_saver_count_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    root = root[0]
    report = []
    for n in [int(c) for c in args.counts.split(",")]:
        sd = moe_state_dict(n, args.total_mb)
        total = sum(t.nbytes for t in sd.values())
        shards = {k: DTensor.from_local(v.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False)
                  for k, v in sd.items() if v.shape[0] % world == 0}
        full_target = {k: torch.empty_like(v) for k, v in sd.items()}
        ours, one = os.path.join(root, f"ours{n}"), os.path.join(root, f"one{n}.safetensors")
        fresh = [0]

        def first_save():  # a new structure each time: the plan is made (an extra tensor, renamed)
            fresh[0] += 1
            dist_save(dict(sd, **{f"fresh.{fresh[0]}": torch.zeros(1)}), ours + f"-first{fresh[0]}")

        reuses = []

        def repeated_save():  # a new directory each time, as the first save's (no overwrite)
            fresh[0] += 1
            reuses.append(dist_save(sd, ours + f"-again{fresh[0]}").plan_reused)

        def sharded_save():  # every rank writes its Shard(0) band of every tensor, in place
            fresh[0] += 1
            dist_save(shards, ours + f"-fsdp{fresh[0]}")

        def single_save():
            if rank == 0:
                save_file(sd, one)

        def dcp_save():
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(root, f"dcp{n}-{time.perf_counter_ns()}")))

        def single_load():
            if rank == 0:
                load_file(one)

        dist_save(sd, ours)  # what the loads read; and the plan the repeated saves reuse
        single_save()
        barrier()
        rows = {"dist_save (plan made)": first_save, "dist_save (plan reused)": repeated_save,
                "dist_save (FSDP2 shards)": sharded_save, "save_file (1 process)": single_save, "DCP save": dcp_save,
                "dist_load (everything)": lambda: dist_load(full_target, ours),
                "dist_load (FSDP2 shards)": lambda: dist_load(shards, ours, strict=False),
                "load_file (1 process)": single_load}
        best: dict[str, float] = {}
        order = list(rows.items())
        for k in range(args.repeat):
            for name, fn in order[k % len(order):] + order[:k % len(order)]:
                best[name] = min(best.get(name, float("inf")), timed(fn))
        if not all(reuses):
            raise SystemExit(f"the repeated saves of {n} tensors did not all reuse their plan: {reuses}")
        report.append((n, total, best))
        barrier()
        if rank == 0:
            for name in os.listdir(root):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True) if os.path.isdir(
                    os.path.join(root, name)) else os.remove(os.path.join(root, name))
        barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\n{world} ranks, dir {args.dir or '/tmp'}, ~{args.total_mb:g} MB bf16 per N, best of {args.repeat}, "
              f"torch {torch.__version__}")
        names = list(report[0][2])
        print(f"{'N':>8} " + " ".join(f"{n[:24]:>24}" for n in names))
        for n, total, best in report:
            print(f"{n:>8} " + " ".join(f"{best[k]:>23.3f}s" for k in names))
        print("ratios (higher is better for dist_saver):")
        for n, total, best in report:
            print(f"{n:>8}  save: {best['save_file (1 process)'] / best['dist_save (plan made)']:.2f}x save_file, "
                  f"{best['DCP save'] / best['dist_save (plan made)']:.2f}x DCP; reused plan "
                  f"{best['dist_save (plan made)'] / best['dist_save (plan reused)']:.2f}x faster; load: "
                  f"{best['load_file (1 process)'] / best['dist_load (everything)']:.2f}x load_file "
                  f"(everything), FSDP2 shards {best['dist_load (FSDP2 shards)']:.3f}s; FSDP2-sharded save "
                  f"{best['dist_save (FSDP2 shards)'] / best['dist_save (plan reused)']:.2f}x the time of the "
                  "replicated one")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "tensor_count", "world": world, "dir": args.dir,
                                    "rows": [{"n": n, "bytes": t, "seconds": b} for n, t, b in report]}) + "\n")
    dist.destroy_process_group()


def plan_only(world: int = 1024, n: int = 100_000) -> None:
    """Pure planning at `world` ranks: every rank runs this same computation from the same data."""
    from torch.distributed.tensor import Shard

    from dist_saver.layout import Layout, group_boxes
    from dist_saver.plan import make_plan, merge_metadata
    from dist_saver.state import TensorMeta

    from dist_saver.exchange import make_schedule
    from dist_saver.plan import SMALL_SHARDED_BYTES

    for mode in ("replicated", "fsdp", "fsdp, small assembled"):
        layout = Layout((world,), tuple(range(world)), (Shard(0),)) if mode != "replicated" else None
        count = n if mode == "replicated" else n // 100  # the FSDP plan is (tensors x ranks): a slice of it
        metas = [TensorMeta(f"model.layers.{i // 768}.mlp.experts.{(i // 3) % 256}.w{i % 3}", "BF16", (2048, 64),
                            layout) for i in range(count)]
        blob = pickle.dumps((metas, {}), protocol=pickle.HIGHEST_PROTOCOL)
        t0 = time.perf_counter()
        infos, aliases = merge_metadata([(list(range(world)), metas)], world, [{}])
        boxes = {m.name: group_boxes(m.name, m.shape, (m.layout,), lambda r: r) for m in metas} if layout else None
        small = SMALL_SHARDED_BYTES if "small" in mode else 0  # dist_save's policy; else all in place
        plan = make_plan(infos, world, None, aliases, boxes, small_sharded_bytes=small)
        pieces = 0
        if small:  # the exchange's schedule, which every rank builds whole
            sched = make_schedule(plan, {m.name: m.shape for m in metas}, boxes)
            pieces = sum(len(c.pieces) for c in sched.chunks)
        seconds = time.perf_counter() - t0
        ranges = sum(len(f.extents) for f in plan.files)
        print(f"{mode:>21}, {world} ranks x {count} tensors: planning {seconds:.2f}s, {ranges} written ranges"
              + (f", {pieces} exchanged pieces" if small else "") + f", one rank's metadata {len(blob) / 1e6:.2f} MB"
              + (f" (x100 tensors: ~{seconds * 100:.0f}s)" if mode != "replicated" else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1000,10000,50000")
    ap.add_argument("--total-mb", type=float, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plan-only", action="store_true")
    args = ap.parse_args()
    if args.plan_only:
        plan_only()
    else:
        run_counts(args)


if __name__ == "__main__":
    main()
