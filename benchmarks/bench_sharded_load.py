"""Loads into sharded models (FSDP2, tensor parallel, 2-D) against DCP, in one run, cold cache.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_sharded_load.py --layout tp --size-gb 2
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_sharded_load.py --layout tp --dir /dev/shm

The model is built in --layout (N processes share one GPU over gloo with --device cuda; host memory
otherwise), saved once with dist_save (our universal Hugging Face layout) and once with dcp.save (DCP's
own checkpoint of that same layout), then loaded back, rows interleaved round by round, best of
--repeat, slowest rank's time:
  dist_load: our checkpoint into the sharded model, checking every recorded checksum of what it
    reads as it reads it (the default); and with verify=False (the checks' cost, same run)
  DCP, its own checkpoint: dcp.load(FileSystemReader) of the same layout (DCP's best case)
  DCP HF reader, our checkpoint: dcp.load(HuggingFaceStorageReader) of our files
Before each row the targets are zeroed and checked afterwards, and the page cache is emptied: as
root, drop_caches; otherwise posix_fadvise(DONTNEED) on every checkpoint file (said in the output).
Per row: GB/s of what the ranks need, and the bytes read from storage (/proc/self/io read_bytes,
summed over the ranks) against the bytes the ranks need (their shards).
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

from dist_saver import dist_load, dist_save
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes, shard_llama

from harness import drop_page_cache, read_bytes, start_ranks  # noqa: E402  (same directory)


def build(layout: str, cfg: dict, world: int, device: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = TinyLlama(**cfg)
    shard_llama(model, layout, world, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(torch.arange(local.numel(), device=device).reshape(local.shape).remainder(251).sub(125)
                        .to(local.dtype) + i)
    return model


def locals_of(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.to_local() if hasattr(v, "to_local") else v
    return out


def drop_cache(dirs: list[str], rank: int) -> str:
    """Rank 0 empties the page cache while the others wait; every rank gets how it was done."""
    dist.barrier()
    box = [drop_page_cache(dirs) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    return box[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["fsdp", "tp", "2d"], default="tp")
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rank, world = start_ranks(args.device)
    cfg = llama_config_for_bytes(int(args.size_gb * 1e9))
    model = build(args.layout, cfg, world, args.device)
    expected = {k: v.clone() for k, v in locals_of(model).items()}
    needed = sum(v.numel() * v.element_size() for v in {id(v): v for v in expected.values()}.values())
    root = [tempfile.mkdtemp(prefix="dist_saver_load_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    ours, theirs = os.path.join(root[0], "ours"), os.path.join(root[0], "dcp")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dist_save(model, ours)
    dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(theirs, sync_files=True))
    total = sum(os.path.getsize(os.path.join(ours, f)) for f in os.listdir(ours) if f.endswith(".safetensors"))

    def hf_targets():  # DCP knows nothing of our tied-weight aliases: leave the tied duplicate out
        sd = model.state_dict()
        return {k: v for k, v in sd.items() if not (k == "lm_head.weight" and cfg.get("tie_embeddings"))}

    rows = {
        "dist_load (our checkpoint)": lambda: dist_load(model, ours),
        "dist_load, verify=False": lambda: dist_load(model, ours, verify=False),
        f"DCP, its own {args.layout} checkpoint": lambda: dcp.load(model.state_dict(),
                                                                    storage_reader=dcp.FileSystemReader(theirs)),
        "DCP HF reader, our checkpoint": lambda: dcp.load(hf_targets(), storage_reader=HuggingFaceStorageReader(ours)),
    }
    results: dict[str, list[dict]] = {}
    how = ""
    order = list(rows.items())
    for round_ in range(args.repeat):
        k = round_ % len(order)
        for name, fn in order[k:] + order[:k]:
            with torch.no_grad():
                for v in locals_of(model).values():
                    v.zero_()
            how = drop_cache([ours, theirs], rank)
            if args.device == "cuda":
                torch.cuda.synchronize()
            before = read_bytes()
            t0 = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            read = read_bytes() - before
            ok = all(torch.equal(v, expected[k]) for k, v in locals_of(model).items())
            stats = [None] * world
            dist.all_gather_object(stats, (seconds, read, needed, ok))
            if not all(s[3] for s in stats):
                raise SystemExit(f"{name}: the loaded tensors differ from the saved ones")
            results.setdefault(name, []).append({"seconds": max(s[0] for s in stats),
                                                 "read_bytes": [s[1] for s in stats],
                                                 "needed_bytes": [s[2] for s in stats]})
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root[0], ignore_errors=True)
        device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU tensors"
        print(f"\nload into {args.layout}, {total / 1e9:.2f} GB checkpoint, {world} ranks ({device}), "
              f"dir {args.dir or '/tmp'}, cold cache by {how}, best of {args.repeat}, torch {torch.__version__}")
        print(f"{'row':<36} {'s':>7} {'GB/s':>6} {'x DCP own':>9} {'read / needed (all ranks)':>26}")
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
        base = best.get(f"DCP, its own {args.layout} checkpoint")
        for name, r in best.items():
            need = sum(r["needed_bytes"])
            ratio = f"{base['seconds'] / r['seconds']:.2f}" if base else "-"
            print(f"{name:<36} {r['seconds']:>7.2f} {need / r['seconds'] / 1e9:>6.2f} {ratio:>9} "
                  f"{sum(r['read_bytes']) / 1e9:>11.2f} / {need / 1e9:.2f} GB")
        checked, unchecked = best["dist_load (our checkpoint)"], best["dist_load, verify=False"]
        from_storage = sum(unchecked["read_bytes"])  # 0 on tmpfs: its pages are the storage
        more = (f", {sum(checked['read_bytes']) / from_storage - 1:+.1%} bytes from storage (whole 1 MiB blocks "
                "around each read)") if from_storage else ""
        print(f"checksums checked while reading: {checked['seconds'] / unchecked['seconds'] - 1:+.1%} time{more}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "sharded_load", "layout": args.layout, "world": world,
                                    "device": device, "dir": args.dir, "cache": how, "rows": results}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
