"""What the benchmarks share: starting the ranks, emptying the page cache, counting storage reads.

The scripts run as `python benchmarks/X.py` or under torchrun, so this directory is on sys.path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def start_ranks(device: str) -> tuple[int, int]:
    """Join the gloo group torchrun set up; one thread per process (N processes share the cores);
    with CUDA, each rank on the GPU LOCAL_RANK picks (several ranks share one GPU over gloo)."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size()


def evict(paths) -> None:
    """posix_fadvise(DONTNEED) on every file under paths (written back first, by the caller)."""
    for path in paths:
        for root, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def drop_page_cache(paths) -> str:
    """Empty the page cache: drop_caches as root (everything, as after a reboot), else evict the
    files under paths. Returns which was done, for the report."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        evict(paths)
        return "fadvise(DONTNEED)"


def read_bytes() -> int:
    """Bytes this process has had read from storage (/proc/self/io; page-cache hits not counted)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])
