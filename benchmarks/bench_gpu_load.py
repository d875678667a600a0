"""One process loading a checkpoint onto one GPU: dist_load against safetensors and fastsafetensors.

    python benchmarks/bench_gpu_load.py --size-gb 4 --dir /dev/shm

A Llama-shaped bf16 checkpoint is saved once (dist_save, 1 GB files); then, rows interleaved round
by round, best of --repeat, cold page cache (drop_caches as root, posix_fadvise(DONTNEED) otherwise,
said in the output) and warm (the same row again at once):
  dist_load into preallocated CUDA tensors   (pinned double buffer, copies on a side stream)
  safetensors.torch.load_file(device="cuda") of every file
  fastsafetensors (nogds) of every file      (skipped, and said, when it is not installed)
Every row's tensors are checked against the saved values (a checksum on the GPU). Columns: seconds,
GB/s, and the extra host memory the row needed (peak RSS over the row, psutil). --device cpu runs
the same rows into host memory, as a check of the script without a GPU (load_file then only maps the
files: not a comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from dist_saver import dist_save, dist_load
from dist_saver.memory import PeakRSS
from dist_saver.synthetic import TinyLlama, llama_config_for_bytes

from harness import drop_page_cache  # noqa: E402  (same directory)


def digest(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.float().sum()) for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    ap.add_argument("--device", default="cuda", help="cpu: the same rows into host memory (a check without a GPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--device cpu runs the rows into host memory)")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    root = tempfile.mkdtemp(prefix="dist_saver_gpu_load_", dir=args.dir)
    path = os.path.join(root, "ckpt")
    try:
        with torch.device("meta"):
            model = TinyLlama(**llama_config_for_bytes(int(args.size_gb * 1e9)))
        model.to_empty(device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-100, 100, p.shape, generator=gen, device=dev).to(p.dtype))
        state = model.state_dict()
        expect = digest(state)
        total = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
        dist_save(model, path, max_shard_size="1GB")
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        targets = {k: torch.empty_like(v) for k, v in state.items()}
        del model, state
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        def ours():  # targets zeroed before the clock starts
            dist_load(targets, path, strict=False)
            sync()
            return targets

        def load_file_row():
            from safetensors.torch import load_file

            out = {}
            for f in files:
                out.update(load_file(f, device=str(dev)))
            sync()
            return out

        rows = {f"dist_load into {dev.type} tensors": ours, f"safetensors load_file(device={dev.type})": load_file_row}
        try:
            from fastsafetensors import SafeTensorsFileLoader, SingleGroup

            def fast_row():
                loader = SafeTensorsFileLoader(SingleGroup(), dev, nogds=True)
                try:
                    loader.add_filenames({0: files})
                    fb = loader.copy_files_to_device()
                    out = {k: fb.get_tensor(k).clone() for k in fb.key_to_rank_lidx}
                    sync()
                    fb.close()
                    return out
                finally:
                    loader.close()

            rows["fastsafetensors (nogds)"] = fast_row
        except ImportError:
            print("fastsafetensors is not installed here: its row is skipped")

        results: dict[str, dict[str, list]] = {}
        how = None
        for _ in range(args.repeat):
            for name, fn in rows.items():
                for cache in ("cold", "warm"):
                    for t in targets.values():
                        t.zero_()
                    sync()
                    if cache == "cold":
                        how = drop_page_cache([path])
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        out = fn()
                        seconds = time.perf_counter() - t0
                    got = digest({k: v for k, v in out.items() if k in targets})
                    if got != expect:
                        raise SystemExit(f"{name}: loaded values differ (checksum {got} != {expect})")
                    del out
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    results.setdefault(name, {}).setdefault(cache, []).append((seconds, mem.extra))
        where = torch.cuda.get_device_name() if dev.type == "cuda" else "host memory"
        print(f"\none process onto {where}: {total / 1e9:.2f} GB bf16 in {len(files)} files, "
              f"{args.dir or tempfile.gettempdir()}, cold cache by {how}, best of {args.repeat} "
              f"(torch {torch.__version__})")
        print(f"{'loader':<38} {'cold s':>7} {'GB/s':>6} {'warm s':>7} {'GB/s':>6} {'extra host MiB':>15}")
        best = {c: min(min(r[c])[0] for n, r in results.items() if not n.startswith("dist_load")) for c in ("cold", "warm")}
        for name, r in results.items():
            cold, warm = min(r["cold"]), min(r["warm"])
            extra = max(x[1] for c in r.values() for x in c)
            print(f"{name:<38} {cold[0]:>7.2f} {total / cold[0] / 1e9:>6.2f} {warm[0]:>7.2f} "
                  f"{total / warm[0] / 1e9:>6.2f} {extra / 2**20:>15.0f}")
        ours_r = results[f"dist_load into {dev.type} tensors"]
        print(f"dist_load vs the best other loader: cold {best['cold'] / min(ours_r['cold'])[0]:.2f}x, "
              f"warm {best['warm'] / min(ours_r['warm'])[0]:.2f}x (>1 is faster)")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "gpu_load", "model_bytes": total, "cache_drop": how,
                                    "rows": {n: {c: [{"seconds": s, "extra_host_bytes": m} for s, m in v]
                                                 for c, v in r.items()} for n, r in results.items()}}) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
