"""How a job ends, under torchrun (tests/test_exit.py): no gloo group of dist_saver's may still be
alive once the interpreter starts finalizing (its worker threads would then touch Python: SIGABRT,
"terminate called without an active exception"), and a pending async save is finished first.

    torchrun --standalone --nproc-per-node 2 tests/exit_job.py DIR destroy|async

destroy: a save, then destroy_process_group() while the world's group object stays referenced (as
an FSDP2 model keeps it), then exit. async: an async save left pending (no wait(), no destroy).
The check runs in an atexit handler registered before dist_saver is imported (atexit is
last-in first-out: it runs after dist_saver's own, still before finalization); exit code 3 if a
group of ours is still alive.
"""

import atexit
import os
import sys
import weakref

_groups = []


def _check() -> None:
    alive = [g for g in _groups if g() is not None]
    print(f"rank {os.environ.get('RANK')}: dist_saver groups alive at exit: {len(alive)}", flush=True)
    if alive:
        os._exit(3)


atexit.register(_check)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_saver import dist_save  # noqa: E402
from dist_saver.comm import own_group  # noqa: E402

path, mode = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
weights = {f"w{i}": torch.full((256, 256), float(i)) for i in range(8)}
dist_save(weights, os.path.join(path, "sync"), overwrite=True)
_groups.append(weakref.ref(own_group(None, 600.0)))  # the cached group the save ran on
keep_world = dist.group.WORLD  # as FSDP2's mesh info does
if mode == "destroy":
    dist.destroy_process_group()
else:
    dist_save(weights, os.path.join(path, "async"), overwrite=True, async_save=True)  # left pending
