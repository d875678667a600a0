"""A full training checkpoint (bf16 Llama-shaped model + fp32 AdamW state, FSDP2): dist_save /
dist_load with optimizer= against torch.distributed.checkpoint of the same model and optimizer
state dicts, saved and loaded in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_train_ckpt.py --size-gb 0.5
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_train_ckpt.py --size-gb 4 --dir /dev/shm

--size-gb is the bf16 model; AdamW's two fp32 moments add 4x that (a checkpoint of about 5x).
N processes share one GPU over gloo with --device cuda (NCCL refuses two ranks on one GPU); with
--device cpu (the default without a GPU) the tensors live in host memory. Rows, interleaved round
by round (order rotated each round), best of --repeat, slowest rank's time:
  dist_save: dist_save(model, out, optimizer=opt, train_state={...}): model-*.safetensors (a plain
      Hugging Face checkpoint) + optimizer-*.safetensors + train_state.json, one atomic publish
  DCP save: dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model,
      opt), "train": {...}}, FileSystemWriter(out, sync_files=True)), state-dict calls included
  dist_load: dist_load(model, out, optimizer=opt) (weights, optimizer state, train_state, RNG)
  DCP load: get_*_state_dict, dcp.load(FileSystemReader), set_model_state_dict and
      set_optimizer_state_dict: the usual DCP resume
Before each round the optimizer state is made anew in --state-dtype; before each load row the model
is zeroed and the state made anew as zeros (checked afterwards, so a load must really fill them).
Both loads end in torch.optim.Optimizer.load_state_dict (through set_optimizer_state_dict), which
casts fp32 moments to the dtype of bf16 parameters: its copies count in both loads' time and
memory (--state-dtype bf16 leaves that out). Unless --warm, every checkpoint file is dropped from
the page cache first (posix_fadvise DONTNEED): both loads read from the storage, not from what the
saves left cached (dist_save drops what it wrote from the cache as it goes, DCP does not).
--dir points at the storage: tmpfs (/dev/shm) stands in for fast node storage.
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
from dist_saver.memory import PeakRSS
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes, shard_llama

from harness import evict, start_ranks  # noqa: E402  (same directory)


def build(cfg: dict, world: int, device: str) -> torch.nn.Module:
    """The model on meta, FSDP2-sharded, then materialised on device with cheap distinct values."""
    with torch.device("meta"):
        model = TinyLlama(**cfg)
    shard_llama(model, "fsdp", world, device)
    model.to_empty(device=device)
    fill_model(model)
    return model


def fill_model(model, zero: bool = False) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.to_local().fill_(0 if zero else i % 97 - 48)


def make_optimizer(model, state_dtype: torch.dtype) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    init_state(model, opt, state_dtype)
    return opt


def init_state(model, opt, dtype: torch.dtype, zero: bool = False) -> None:
    """AdamW's state, made anew: the two moments in `dtype` (fp32: as a mixed-precision job keeps
    them), sharded like the parameters (FSDP2 DTensors), with cheap distinct values (or zeros)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            st = {"step": torch.tensor(0.0 if zero else 1000.0),
                  "exp_avg": torch.zeros_like(p, dtype=dtype), "exp_avg_sq": torch.zeros_like(p, dtype=dtype)}
            if not zero:
                st["exp_avg"].to_local().fill_((i % 89) * 1e-3)
                st["exp_avg_sq"].to_local().fill_((i % 83) * 1e-6 + 1e-8)
            opt.state[p] = st


def check_filled(model, opt) -> None:
    """After a load: every local piece holds its value again (first and last element)."""
    for i, p in enumerate(model.parameters()):
        st = opt.state[p]
        for t, want in ((p, i % 97 - 48), (st["exp_avg"], (i % 89) * 1e-3), (st["exp_avg_sq"], (i % 83) * 1e-6 + 1e-8)):
            local = t.to_local().reshape(-1)
            if local.numel():
                want = torch.tensor(want, dtype=local.dtype).item()
                got = (local[0].item(), local[-1].item())
                assert got == (want, want), f"parameter {i}: loaded {got}, expected {want}"
        assert float(st["step"]) == 1000.0, f"parameter {i}: step {float(st['step'])}"


def tensor_bytes(model, opt) -> int:
    """Bytes of the full (unsharded) tensors a checkpoint holds: weights + optimizer state."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        for v in opt.state[p].values():
            total += v.numel() * v.element_size()
    return total


def disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0, help="bf16 model size (the checkpoint is ~5x)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="parent of the scratch directories (default: /tmp)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="AdamW moments: fp32 (default; every load casts them to the bf16 parameters' dtype, as "
                         "torch.optim.Optimizer.load_state_dict does) or bf16 (what AdamW makes for bf16 parameters)")
    ap.add_argument("--warm", action="store_true", help="load from the page cache (no DONTNEED before loads)")
    ap.add_argument("--json", default=None, help="append the results as a JSON line here")
    args = ap.parse_args()

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank, world = start_ranks(args.device)
    cfg = llama_config_for_bytes(int(args.size_gb * 1e9))
    model = build(cfg, world, args.device)
    state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.state_dtype]
    opt = make_optimizer(model, state_dtype)
    total = tensor_bytes(model, opt)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    root = [tempfile.mkdtemp(prefix="dist_saver_train_ckpt_", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    root = root[0]
    ours_dir, dcp_dir = os.path.join(root, "dist_saver"), os.path.join(root, "dcp")
    train_state = {"step": 1000, "epoch": 0, "scheduler": {"last_epoch": 1000, "_last_lr": [1e-4]},
                   "data": {"position": 1000 * 64}}
    results: dict[str, list[dict]] = {}
    on_disk: dict[str, int] = {}

    def save_ours():
        dist_save(model, ours_dir, optimizer=opt, train_state=train_state)

    def save_dcp():
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "train": dict(train_state)}
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(dcp_dir, sync_files=True))

    def load_ours():
        res = dist_load(model, ours_dir, optimizer=opt)
        assert res.train_state == train_state, res.train_state

    def load_dcp():
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "train": {"step": 0, "epoch": 0, "scheduler": {}, "data": {}}}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(dcp_dir))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        assert sd["train"]["step"] == train_state["step"], sd["train"]

    saves = {"dist_save (model + optimizer + train_state)": (save_ours, ours_dir),
             "DCP save (model + optim)": (save_dcp, dcp_dir)}
    loads = {"dist_load (model + optimizer + train_state)": load_ours,
             "DCP load + set_*_state_dict": load_dcp}

    def timed(name, fn):
        gpu_base = 0
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        dist.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        gpu_extra = torch.cuda.max_memory_allocated() - gpu_base if args.device == "cuda" else 0
        stats = [None] * world
        dist.all_gather_object(stats, (seconds, mem.extra, gpu_extra))
        results.setdefault(name, []).append({"seconds": max(s[0] for s in stats),
                                             "extra_rss": max(s[1] for s in stats),
                                             "extra_rss_by_rank": [s[1] for s in stats],
                                             "extra_gpu": max(s[2] for s in stats)})

    for round_ in range(args.repeat):
        fill_model(model)
        init_state(model, opt, state_dtype)  # a load of the previous round cast it to the parameters' dtype
        order = list(saves.items())
        k = round_ % len(order)
        for name, (fn, out) in order[k:] + order[:k]:
            dist.barrier()
            if rank == 0:  # removing the previous round's files is not part of a save
                shutil.rmtree(out, ignore_errors=True)
            timed(name, fn)
            dist.barrier()
            if rank == 0:
                on_disk[name] = disk_bytes(out)
        order = list(loads.items())
        for name, fn in order[k:] + order[:k]:
            fill_model(model, zero=True)
            init_state(model, opt, state_dtype, zero=True)
            dist.barrier()
            if not args.warm:
                evict([ours_dir, dcp_dir])
            timed(name, fn)
            check_filled(model, opt)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        report(results, on_disk, total, model_bytes, world, args)
    dist.destroy_process_group()


def report(results, on_disk, total, model_bytes, world, args) -> None:
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in results.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU tensors"
    cache = "warm page cache" if args.warm else "cold page cache"
    print(f"\nFSDP2 training checkpoint: {model_bytes / 1e9:.2f} GB bf16 model + "
          f"{(total - model_bytes) / 1e9:.2f} GB {args.state_dtype} AdamW state = {total / 1e9:.2f} GB, {world} ranks ({device}), "
          f"dir {args.dir or '/tmp'}, loads from a {cache}, best of {args.repeat}, torch {torch.__version__}")
    gpu = args.device == "cuda"
    print(f"{'row':<46} {'s':>7} {'GB/s':>6} {'x DCP':>6} {'on disk GB':>10} {'peak extra RSS MiB/rank':>23}"
          + (f" {'extra GPU MiB/rank':>18}" if gpu else ""))
    pairs = {"dist_save (model + optimizer + train_state)": "DCP save (model + optim)",
             "dist_load (model + optimizer + train_state)": "DCP load + set_*_state_dict"}
    for name, r in best.items():
        ratio = f"{best[pairs[name]]['seconds'] / r['seconds']:.2f}" if name in pairs and pairs[name] in best else "-"
        disk = f"{on_disk[name] / 1e9:.3f}" if name in on_disk else ""
        extra = max(x["extra_rss"] for x in results[name])  # of every round: the first allocates buffers
        extra_gpu = max(x["extra_gpu"] for x in results[name])
        print(f"{name:<46} {r['seconds']:>7.2f} {total / r['seconds'] / 1e9:>6.2f} {ratio:>6} {disk:>10} "
              f"{extra / 2**20:>23.0f}" + (f" {extra_gpu / 2**20:>18.0f}" if gpu else ""))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "train_ckpt", "world": world, "device": device, "dir": args.dir,
                                "warm": args.warm, "state_dtype": args.state_dtype, "model_bytes": model_bytes, "tensor_bytes": total,
                                "on_disk": on_disk, "rows": results}) + "\n")


if __name__ == "__main__":
    main()
