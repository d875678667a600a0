"""Sharded saves (FSDP2, tensor parallel, 2-D) against a replicated save of the same model, in one run.

    torchrun --standalone --nproc-per-node 8 benchmarks/bench_sharded_save.py --layout fsdp --dir /dev/shm
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_sharded_save.py --layout fsdp --size-gb 4

N processes share one GPU over gloo (NCCL refuses two ranks on one GPU); without a GPU (or with
--device cpu) the tensors live in host memory. Same synthetic Llama-shaped bf16 model in every row,
rows interleaved round by round (order rotated each round), best of --repeat, slowest rank's time:
  raw: every rank writes 1/N of the model bytes from a pinned 64 MiB host buffer to its own file, +fsync
  dist_save replicated: the whole model on every rank (no exchange: each rank writes 1/N)
  dist_save sharded: the model in --layout (FSDP2 Shard(0) pieces written in place; rowwise TP
      and 2-D column pieces assembled through the exchange)
  DCP FileSystemWriter: the sharded model (.distcp, not HF-loadable: the throughput reference)
  and each saver async: how long the call blocks, and until the save is complete.
--dir points at the storage: tmpfs (/dev/shm) stands in for fast node storage (NVMe RAID, Lustre,
GPFS), where the software, not the disk, sets the pace.
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

from dist_saver import dist_save
from dist_saver.buffers import aligned_empty, as_bytes
from dist_saver.memory import PeakRSS
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes, shard_llama

from harness import start_ranks  # noqa: E402  (same directory)


def build(layout: str, cfg: dict, world: int, device: str) -> torch.nn.Module:
    """The model on meta, sharded as asked, then materialised on device with cheap distinct values."""
    with torch.device("meta"):
        model = TinyLlama(**cfg)
    shard_llama(model, "none" if layout == "replicated" else layout, world, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(i % 97 - 48)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["fsdp", "tp", "2d"], default="fsdp")
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the rows to run")
    ap.add_argument("--no-async", action="store_true", help="skip the async rows")
    ap.add_argument("--json", default=None, help="append the results as a JSON line here")
    args = ap.parse_args()

    rank, world = start_ranks(args.device)
    if args.layout == "2d" and (world < 4 or world % 2):
        raise SystemExit("--layout 2d needs an even world size >= 4 (tp=2 inside world/2 dp replicas)")
    cfg = llama_config_for_bytes(int(args.size_gb * 1e9))
    replicated = build("replicated", cfg, world, args.device)
    sharded = build(args.layout, cfg, world, args.device)
    total = sum(p.numel() * p.element_size() for p in replicated.parameters())
    share = -(-total // world)
    raw_buf = aligned_empty(64 << 20, pinned=args.device == "cuda")  # written over and over
    root = [tempfile.mkdtemp(prefix="dist_saver_sharded_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    root = root[0]
    out = os.path.join(root, "out")
    results: dict[str, list[dict]] = {}
    sent: list[int] = []

    def raw(_):
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, f"raw{rank}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view, left = as_bytes(raw_buf), share
        while left > 0:
            left -= os.write(fd, view[: min(len(view), left)])
        os.fsync(fd)
        os.close(fd)

    def ours(model, async_save=False):
        def row(_):
            res = dist_save(model, out, async_save=async_save)
            if async_save:
                blocking = res.blocking_seconds
                res = res.wait()
                return blocking
            if model is sharded:
                sent.append(sum(res.bytes_sent))
            return None
        return row

    def dcp_row(async_save=False):
        import torch.distributed.checkpoint as dcp

        def row(_):
            sd = sharded.state_dict()
            writer = dcp.FileSystemWriter(out, sync_files=True)
            if not async_save:
                dcp.save(sd, storage_writer=writer)
                return None
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, storage_writer=writer)
            blocking = time.perf_counter() - t0
            fut.result()
            return blocking
        return row

    rows = {
        "raw write, each rank 1/N (+fsync)": raw,
        "dist_save replicated": ours(replicated),
        f"dist_save {args.layout}": ours(sharded),
        f"DCP FileSystemWriter {args.layout}": dcp_row(),
    }
    if not args.no_async:
        rows.update({
            "dist_save replicated, async": ours(replicated, True),
            f"dist_save {args.layout}, async": ours(sharded, True),
            f"DCP async_save {args.layout}": dcp_row(True),
        })
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        rows = {k: v for k, v in rows.items() if any(s in k for s in keep)}
    order = list(rows.items())
    for round_ in range(args.repeat):
        k = round_ % len(order)
        for name, fn in order[k:] + order[:k]:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                blocking = fn(out)
                seconds = time.perf_counter() - t0
            stats = [None] * world
            dist.all_gather_object(stats, (seconds, blocking, mem.extra))
            entry = {"seconds": max(s[0] for s in stats), "extra_rss": max(s[2] for s in stats)}
            if stats[0][1] is not None:
                entry["blocking"] = max(s[1] for s in stats)
            results.setdefault(name, []).append(entry)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        report(results, total, world, args, sent)
    dist.destroy_process_group()


def report(results, total, world, args, sent) -> None:
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
    base = {k: best[k]["seconds"] for k in ("raw write, each rank 1/N (+fsync)", "dist_save replicated") if k in best}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU tensors"
    print(f"\n{args.layout}, {total / 1e9:.2f} GB bf16, {world} ranks ({device}), dir {args.dir or '/tmp'}, "
          f"best of {args.repeat}, torch {torch.__version__}")
    print(f"{'row':<40} {'s':>7} {'GB/s':>6} {'x raw':>6} {'x repl.':>7} {'blocking s':>10} {'extra RSS MiB':>13}")
    for name, r in best.items():
        raw = f"{base['raw write, each rank 1/N (+fsync)'] / r['seconds']:.2f}" if len(base) == 2 else "-"
        rep = f"{base['dist_save replicated'] / r['seconds']:.2f}" if "dist_save replicated" in base else "-"
        blk = f"{min(x['blocking'] for x in results[name]):.3f}" if "blocking" in r else ""
        print(f"{name:<40} {r['seconds']:>7.2f} {total / r['seconds'] / 1e9:>6.2f} {raw:>6} {rep:>7} {blk:>10} "
              f"{r['extra_rss'] / 2**20:>13.0f}")
    ours, dcp = f"dist_save {args.layout}", f"DCP FileSystemWriter {args.layout}"
    if ours in best and dcp in best:
        print(f"{ours} vs DCP FileSystemWriter: {best[dcp]['seconds'] / best[ours]['seconds']:.2f}x")
    if sent:
        print(f"bytes through the exchange per {args.layout} save: {sent[0] / 1e9:.3f} GB "
              f"({sent[0] / total:.1%} of the model)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "sharded_save", "layout": args.layout, "world": world, "device": device,
                                "dir": args.dir, "model_bytes": total, "rows": results}) + "\n")


if __name__ == "__main__":
    main()
