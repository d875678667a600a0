"""Progress over all ranks: each rank adds the bytes it has written (or read) to a counter in the
process group's key-value store, a few times a second; rank 0 draws one tqdm bar from the sum.

tqdm is optional; the bar is off when stderr is not a terminal (unless asked for) and appears only
for operations longer than SHOW_AFTER_S. Ranks report whether or not rank 0 draws (they cannot
know): a throttled store add costs well under a millisecond.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time

import torch.distributed as dist

log = logging.getLogger("dist_saver")

SHOW_AFTER_S = 2.0  # tqdm's delay: short saves and loads print nothing
REPORT_EVERY_S = 0.25  # how often a rank adds its bytes to the store, and rank 0 redraws

_calls: dict[tuple, int] = {}  # per (kind, group): its ranks call in the same order


def _default_store():
    try:  # the store torchrun's rendezvous (or init_process_group) made; private API, so guarded
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Bytes done by this rank -> the shared counter; on rank 0 with show, a bar of all ranks'.

    enabled: None (auto: draw when stderr is a terminal), True (draw if tqdm is installed), False
    (no bar, no reporting). Pass the same on every rank: rank 0 removes the counters it used.
    """

    def __init__(self, kind: str, comm, label: str, enabled: bool | None = None):
        self.comm = comm
        self.enabled = enabled is not False
        ranks = ",".join(str(comm.global_rank(r)) for r in range(comm.world_size)) if comm.active else "0"
        group = hashlib.sha1(ranks.encode()).hexdigest()[:12]  # short keys, even for 1000 ranks
        n = _calls[kind, group] = _calls.get((kind, group), 0) + 1
        self.key = f"dist_saver/progress/{kind}/{group}/{n}"
        self.store = _default_store() if self.enabled and comm.active and comm.world_size > 1 else None
        self.lock = threading.Lock()
        self.pending = 0
        self.done_local = 0
        self.last = time.monotonic()
        self.bar = None
        self.total = 0
        self._stop = threading.Event()
        self._thread = None
        tqdm = _tqdm()
        show = comm.rank == 0 and self.enabled and (enabled is True or sys.stderr.isatty())
        if show and tqdm is None and enabled is True:
            log.warning("progress=True needs tqdm (pip install tqdm); no progress bar")
        if show and tqdm is not None:
            self.bar = tqdm(total=0, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                            delay=0 if enabled is True else SHOW_AFTER_S, file=sys.stderr)

    def set_total(self, nbytes: int) -> None:
        """This rank's share of the work. Rank 0's bar shows the sum of every rank's."""
        if not self.enabled:
            return
        self.total += int(nbytes)
        self._store_add("/total", int(nbytes))
        if self.bar is not None and self._thread is None:
            self._thread = threading.Thread(target=self._draw, name="dist_saver-progress", daemon=True)
            self._thread.start()

    def add(self, nbytes: int) -> None:
        """Called as bytes land (any thread); reports to the store at most every REPORT_EVERY_S."""
        if not self.enabled:
            return
        with self.lock:
            self.pending += nbytes
            self.done_local += nbytes
            now = time.monotonic()
            if self.store is not None and now - self.last >= REPORT_EVERY_S:
                self._store_add("", self.pending)
                self.pending, self.last = 0, now

    def flush(self) -> None:
        """Report what is left; every rank calls it before the operation's last collective."""
        if not self.enabled:
            return
        with self.lock:
            if self.pending:
                self._store_add("", self.pending)
            self.pending = 0

    def _store_add(self, suffix: str, n: int) -> int:
        """store.add that never fails the save or load: a progress bar is not worth a checkpoint."""
        if self.store is None:
            return 0
        try:
            return self.store.add(self.key + suffix, n)
        except Exception as e:  # e.g. a store timeout: stop reporting, keep going
            log.warning("progress: the process group's store failed (%s); no more progress reports", e)
            self.store = None
            return 0

    def done_all(self) -> tuple[int, int]:
        """(bytes done, total bytes) over all ranks, as reported so far."""
        if self.store is None:
            return self.done_local, self.total
        return self._store_add("", 0), self._store_add("/total", 0)

    def _draw(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            self._update()

    def _update(self) -> None:
        done, total = self.done_all()
        self.bar.total = total
        self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> tuple[int, int]:
        """After the operation's last collective (every rank has flushed): rank 0 draws the last
        state, removes the keys and returns done_all(); other ranks return (their bytes, 0)."""
        if not self.enabled:
            return 0, 0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.comm.rank != 0:  # rank 0 may have removed the keys already
            return self.done_local, 0
        result = self.done_all()
        if self.bar is not None:
            self._update()
            self.bar.close()
        if self.store is not None:
            for key in (self.key, self.key + "/total"):
                try:
                    self.store.delete_key(key)
                except Exception:  # not every store can delete (e.g. FileStore before 2.x): harmless
                    pass
        return result
