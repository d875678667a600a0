"""Save throughput of dist_save against the disk and the usual alternatives, in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_save.py --size-gb 4 --layout replicated
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_save.py --size-gb 4 --layout fsdp

Same synthetic Llama-shaped bf16 model for every row; rows are interleaved round by round (in a
rotated order each round) so they share the disk's mood; each row's time is the slowest rank's,
best of --repeat rounds. Rows:
  raw: every rank writes its 1/N of the model bytes to its own file: page cache / +fsync / O_DIRECT
  dist_save (durable: buffered with early writeback, the default; and O_DIRECT), with and without checksums
  save_file: safetensors.torch.save_file of the full state dict from one process (+fsync)
  rank-0 gather + hub: get_model_state_dict(full_state_dict, cpu_offload) then huggingface_hub's
      save_torch_state_dict on rank 0 (if huggingface_hub is installed)
  DCP FileSystemWriter (.distcp, not HF-loadable: the throughput reference)
  DCP HF writer + consolidation, timed until the directory is HF-loadable
  conversions of an existing DCP checkpoint (its writing not timed): dist_saver's convert_dcp, and
      DCP's consolidate_safetensors_files_on_every_rank of the HF writer's per-rank pieces
Columns: seconds, GB/s of model bytes, ratio to the best durable raw path, bytes written to disk
(all ranks, /proc/self/io), peak RSS per rank over its RSS when the row started.
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

from dist_saver import dist_save
from dist_saver.buffers import aligned_empty, as_bytes
from dist_saver.memory import PeakRSS
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes, shard_llama


def _io_written() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["write_bytes"])


def build_model(layout: str, size_gb: float, world: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = TinyLlama(**llama_config_for_bytes(int(size_gb * 1e9)))
    shard_llama(model, "none" if layout == "replicated" else layout, world)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same values on every rank for replicated tensors
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(torch.randint(-100, 100, local.shape, generator=gen).to(local.dtype))
    return model


class Bench:
    def __init__(self, args):
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        root = [tempfile.mkdtemp(prefix="dist_saver_bench_", dir=args.dir) if self.rank == 0 else None]
        dist.broadcast_object_list(root, src=0)
        self.root = root[0]
        self.rows: dict[str, list[dict]] = {}

    def clean(self) -> None:
        dist.barrier()
        if self.rank == 0:
            for name in os.listdir(self.root):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        dist.barrier()

    def run(self, name: str, fn) -> None:
        self.clean()
        if isinstance(fn, tuple):  # (prepare, timed): the source a conversion starts from
            prepare, fn = fn
            prepare(os.path.join(self.root, "src"))
            dist.barrier()
        before = _io_written()
        dist.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            ok = True
            try:
                fn(os.path.join(self.root, "out"))
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                ok = False
                if self.rank == 0:
                    print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            mine = time.perf_counter() - t0
            dist.barrier()
        written = _io_written() - before
        stats = [None] * self.world
        dist.all_gather_object(stats, (mine, written, mem.extra, ok))
        if all(s[3] for s in stats):
            self.rows.setdefault(name, []).append({
                "seconds": max(s[0] for s in stats), "disk_bytes": sum(s[1] for s in stats),
                "peak_extra_rss": max(s[2] for s in stats)})
            if self.rank == 0:
                print(f"  {name}: {max(s[0] for s in stats):.2f}s", flush=True)


def raw_writer(nbytes: int, mode: str, buf: torch.Tensor):
    """Each rank writes nbytes from a touched aligned buffer, like a perfect writer would."""

    def fn(out):
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"raw{dist.get_rank()}.bin")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
        fd = os.open(path, flags, 0o644)
        view = as_bytes(buf)
        left = nbytes
        while left > 0:
            n = min(len(view), -(-left // 4096) * 4096)
            os.write(fd, view[:n])
            left -= n
        if mode != "cache":
            os.fsync(fd)
        os.close(fd)

    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--layout", choices=["replicated", "fsdp", "tp"], default="replicated")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--only", default=None, help="comma-separated row names to run")
    ap.add_argument("--bucket", default=None, help="dist_save's bucket_size (default: its own)")
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    ap.add_argument("--plot", default=None, help="then draw GB/s by world size and saver from every run "
                    "in --json (e.g. earlier runs at other world sizes) into this PNG (needs matplotlib)")
    args = ap.parse_args()
    if args.plot and not args.json:
        ap.error("--plot draws from the --json file: give both")

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.layout, args.size_gb, world)
    sd = model.state_dict()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    share = -(-total // world)
    bench = Bench(args)
    raw_buf = aligned_empty(64 << 20)

    bucket = {"bucket_size": args.bucket} if args.bucket else {}

    def dist_saver_row(out):
        dist_save(model, out, **bucket)

    def dist_saver_no_checksum_row(out):
        dist_save(model, out, checksums=False, **bucket)

    def dist_saver_direct_row(out):
        dist_save(model, out, direct_io=True, **bucket)

    def save_file_row(out):
        from safetensors.torch import save_file

        full = _full_state_dict(model)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            save_file(full, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
            _fsync_tree(out)

    def rank0_hub_row(out):
        from huggingface_hub import save_torch_state_dict

        full = _full_state_dict(model)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            save_torch_state_dict(full, out, max_shard_size="5GB")
            _fsync_tree(out)

    def dcp_row(out):
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, storage_writer=dcp.FileSystemWriter(out, sync_files=True))

    def dcp_hf_row(out):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        writer = HuggingFaceStorageWriter(out, save_distributed=True, enable_consolidation=True)
        dcp.save(sd, storage_writer=writer)

    def dcp_source(out):
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, storage_writer=dcp.FileSystemWriter(out, sync_files=True))

    def convert_row(out):
        from dist_saver import convert_dcp

        convert_dcp(os.path.join(bench.root, "src"), out)

    def dcp_hf_pieces(out):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        names = sorted(sd)
        mapping = {n: 1 + i * 4 // len(names) for i, n in enumerate(names)}  # 4 output files
        dcp.save(sd, storage_writer=HuggingFaceStorageWriter(out, fqn_to_index_mapping=mapping,
                                                             save_distributed=True))
        bench.mapping = mapping

    def consolidate_row(out):
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files_on_every_rank,
        )

        os.makedirs(out, exist_ok=True)
        consolidate_safetensors_files_on_every_rank(
            os.path.join(bench.root, "src"), out, bench.mapping)

    rows = {
        "raw write, page cache": raw_writer(share, "cache", raw_buf),
        "raw write + fsync": raw_writer(share, "fsync", raw_buf),
        "raw O_DIRECT + fsync": raw_writer(share, "direct", raw_buf),
        "dist_save": dist_saver_row,
        "dist_save, no checksums": dist_saver_no_checksum_row,
        "dist_save, O_DIRECT (direct_io=True)": dist_saver_direct_row,
        "save_file, one process (+fsync)": save_file_row,
        "rank-0 gather + hub save": rank0_hub_row,
        "DCP FileSystemWriter (not HF)": dcp_row,
        "DCP HF writer + consolidation": dcp_hf_row,
        "convert: DCP -> HF with convert_dcp": (dcp_source, convert_row),
        "convert: DCP consolidate on every rank": (dcp_hf_pieces, consolidate_row),
    }
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        rows = {k: v for k, v in rows.items() if any(s in k for s in keep)}
    order = list(rows.items())
    for round_ in range(args.repeat):
        if rank == 0:
            print(f"round {round_ + 1}/{args.repeat}", flush=True)
        # Rotate the order each round: on a VM that hands freed memory back to its host, a
        # page-cache writer is much faster right after another one freed its pages.
        k = round_ % len(order)
        for name, fn in order[k:] + order[:k]:
            bench.run(name, fn)
    bench.clean()
    if rank == 0:
        shutil.rmtree(bench.root, ignore_errors=True)
        _report(bench.rows, total, world, args)
    dist.destroy_process_group()


def _full_state_dict(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(hasattr(p, "placements") for p in model.parameters()):
        return model.state_dict()  # replicated: rank 0 already holds everything
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsync_tree(path):
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _report(rows, total, world, args) -> None:
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in rows.items() if v}
    durable = [best[k]["seconds"] for k in ("raw write + fsync", "raw O_DIRECT + fsync") if k in best]
    ceiling = min(durable) if durable else None
    print(f"\n{args.layout} model, {total / 1e9:.2f} GB bf16, {world} ranks, best of {args.repeat} "
          f"(torch {torch.__version__})")
    print(f"{'saver':<34} {'s':>7} {'GB/s':>6} {'x best raw':>10} {'median s':>8} {'disk GB':>8} {'extra RSS GiB':>13}")
    for name, r in best.items():
        ratio = f"{ceiling / r['seconds']:.2f}" if ceiling else "-"
        med = statistics.median(x["seconds"] for x in rows[name])
        print(f"{name:<34} {r['seconds']:>7.2f} {total / r['seconds'] / 1e9:>6.2f} {ratio:>10} {med:>8.2f} "
              f"{r['disk_bytes'] / 1e9:>8.2f} {r['peak_extra_rss'] / 2**30:>13.2f}")
    if "dist_save" in best and "dist_save, no checksums" in best:
        print(f"checksums cost: {best['dist_save']['seconds'] / best['dist_save, no checksums']['seconds'] - 1:+.1%} "
              f"of save time (best of each)")
    if "dist_save" in best and "DCP HF writer + consolidation" in best:
        print(f"dist_save vs DCP HF + consolidation: "
              f"{best['DCP HF writer + consolidation']['seconds'] / best['dist_save']['seconds']:.1f}x faster")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "save", "layout": args.layout, "world": world, "model_bytes": total,
                                "rows": rows}) + "\n")
    if args.plot:
        from plot import plot  # benchmarks/plot.py, beside this script

        plot([args.json], args.plot)


if __name__ == "__main__":
    main()
