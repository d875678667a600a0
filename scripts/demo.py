"""Demo, run under torchrun: every rank saves its share of a Llama-shaped model, then loads it back;
then the same model sharded with FSDP2 is saved in place (each rank writes the rows it holds).

    torchrun --standalone --nproc-per-node 4 scripts/demo.py /tmp/demo_checkpoint
"""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dist_saver import dist_load, dist_save, load_state_dict
from dist_saver.synthetic import TinyLlama, shard_llama


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # Every rank holds the same weights (as under DDP); each writes only the tensors it owns.
    model = TinyLlama(vocab=4096, hidden=256, kv=64, intermediate=704, layers=8, dtype=torch.bfloat16, seed=0)
    result = dist_save(model, path, max_shard_size="2MB", overwrite=True)
    mine = ", ".join(f"{f.name} ({f.size / 1e6:.2f} MB, {len(f.tensors)} tensors)" for f in result.my_files)
    print(f"[rank {rank}] wrote {mine or 'nothing'}", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"saved {result.total_bytes / 1e6:.1f} MB in {len(result.files)} files from {world} ranks "
              f"in {result.seconds:.2f}s -> {path}", flush=True)

    # Load back into a differently initialised model on every rank and compare bit for bit.
    fresh = TinyLlama(vocab=4096, hidden=256, kv=64, intermediate=704, layers=8, dtype=torch.bfloat16, seed=1)
    res = dist_load(fresh, path)
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    print(f"[rank {rank}] loaded {len(res.loaded)} tensors from {len(res.files_opened)} files: "
          f"{'bit-identical' if same else 'MISMATCH'}", flush=True)
    dist.barrier()
    if rank == 0:
        # The result is a plain Hugging Face checkpoint: plain safetensors reads every file.
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        n = sum(len(load_file(os.path.join(path, f))) for f in files)
        sd = load_state_dict(path)
        print(f"safetensors.load_file reads {n} tensors from {len(files)} files; "
              f"load_state_dict restores {len(sd)} names (tied lm_head included: "
              f"{sd['lm_head.weight'] is sd['model.embed_tokens.weight']})", flush=True)

    # FSDP2: every rank holds 1/N of each tensor and writes those rows where they belong in the
    # owners' files; nothing crosses the network.
    sharded = shard_llama(TinyLlama(vocab=4096, hidden=256, kv=64, intermediate=704, layers=8,
                                    dtype=torch.bfloat16, seed=0), "fsdp", world)
    result = dist_save(sharded, path + "-fsdp", max_shard_size="2MB", overwrite=True)
    if rank == 0:
        writers = sum(len(f.writers) for f in result.files) / len(result.files)
        same = all(torch.equal(a, b) for a, b in zip(load_state_dict(path + "-fsdp").values(),
                                                     load_state_dict(path).values()))
        print(f"FSDP2 save: {len(result.files)} files, {writers:.1f} writing ranks per file, bytes written per "
              f"rank {[round(b / 1e6, 2) for b in result.bytes_written]} MB, "
              f"{sum(result.bytes_sent)} bytes exchanged, same tensors as the replicated save: {same}",
              flush=True)
    dist.destroy_process_group()
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dist_saver_demo")
