"""Progress over all ranks: each rank adds the bytes it has written (or read) to a counter in the
process group's key-value store, a few times a second; rank 0 draws one tqdm bar from the sum.

tqdm is optional; the bar is off when stderr is not a terminal (unless asked for) and appears only
for operations longer than SHOW_AFTER_S, counted from the operation's start (not the bar's: a save
makes its bar only when writing starts, and tqdm's own `delay` never drew a bar that closed before
it, so a 3 s save whose writes took 1.5 s drew nothing). Sizes in GB (10^9), as the log line and
SaveResult. Ranks report whether or not rank 0 draws (they cannot know): a throttled store add
costs well under a millisecond.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import weakref

from .torch_compat import default_store

log = logging.getLogger("dist_saver")

SHOW_AFTER_S = 2.0  # auto mode: operations shorter than this print nothing
REPORT_EVERY_S = 0.25  # how often a rank adds its bytes to the store, and rank 0 redraws
# tqdm's default, with the unit on the sizes too ("1.50GB/3.00GB", not "1.50G/3.00G")
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

# Calls per kind, per group: its ranks call in the same order, so the n-th call's key is the same on
# every rank. Keyed by the group object (weakly): a process group destroyed and initialised again
# starts counting afresh, as processes that join it new do.
_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_calls_no_group: dict[str, int] = {}


def _next_call(kind: str, group) -> int:
    counts = _calls.setdefault(group, {}) if group is not None else _calls_no_group
    counts[kind] = counts.get(kind, 0) + 1
    return counts[kind]


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Bytes done by this rank -> the shared counter; on rank 0 with show, a bar of all ranks'.

    enabled: None (auto: draw when stderr is a terminal, once the operation has run SHOW_AFTER_S),
    True (draw at once if tqdm is installed), False (no bar, no reporting). Pass the same on every
    rank: rank 0 removes the counters it used. started: time.perf_counter() at the operation's
    start (default: now), from which auto mode counts.
    """

    def __init__(self, kind: str, comm, label: str, enabled: bool | None = None, started: float | None = None):
        self.comm = comm
        self.enabled = enabled is not False
        ranks = ",".join(str(comm.global_rank(r)) for r in range(comm.world_size)) if comm.active else "0"
        group = hashlib.sha1(ranks.encode()).hexdigest()[:12]  # short keys, even for 1000 ranks
        identity = getattr(comm, "identity", None)
        n = _next_call(kind, identity)
        # the group's name too: groups of the same ranks (another timeout) count separately
        self.key = f"dist_saver/progress/{kind}/{group}/{getattr(identity, 'group_name', '')}/{n}"
        self.store = default_store() if self.enabled and comm.active and comm.world_size > 1 else None
        self.lock = threading.Lock()
        self.pending = 0
        self.done_local = 0
        self.last = time.monotonic()
        self.bar = None
        self.total = 0
        self._stop = threading.Event()
        self._thread = None
        self.label = label
        self.started = time.perf_counter() if started is None else started
        # auto: the bar is made once the operation has run SHOW_AFTER_S (in the drawing thread, or
        # at close); True: now. tqdm's delay is not used: it counts from the bar's creation.
        self.show_after = 0.0 if enabled is True else SHOW_AFTER_S
        self._tqdm = None
        tqdm = _tqdm()
        show = comm.rank == 0 and self.enabled and (enabled is True or sys.stderr.isatty())
        if show and tqdm is None and enabled is True:
            log.warning("progress=True needs tqdm (pip install tqdm); no progress bar")
        if show and tqdm is not None:
            self._tqdm = tqdm
            self._make_bar()

    def _make_bar(self) -> None:
        """The bar, if it is time to show it; its clock starts at the operation's start."""
        elapsed = time.perf_counter() - self.started
        if self.bar is not None or self._tqdm is None or elapsed < self.show_after:
            return
        # GB (10^9), as the log line and SaveResult.gb_per_s
        self.bar = self._tqdm(total=self.total_all(), desc=self.label, unit="B", unit_scale=True,
                              unit_divisor=1000, file=sys.stderr, bar_format=BAR_FORMAT)
        self.bar.start_t -= elapsed  # tqdm's elapsed time and rate: from the operation's start

    def set_total(self, nbytes: int) -> None:
        """This rank's share of the work. Rank 0's bar shows the sum of every rank's."""
        if not self.enabled:
            return
        self.total += int(nbytes)
        self._store_add("/total", int(nbytes))
        if self._tqdm is not None and self._thread is None:
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

    def total_all(self) -> int:
        return self.total if self.store is None else self._store_add("/total", 0)

    def _draw(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            self._make_bar()
            if self.bar is not None:
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
        self._make_bar()  # an operation that ran SHOW_AFTER_S gets its final state drawn, even if
        if self.bar is not None:  # its bytes all moved in less
            self._update()
            self.bar.close()
        if self.store is not None:
            for key in (self.key, self.key + "/total"):
                try:
                    self.store.delete_key(key)
                except Exception:  # not every store can delete (e.g. FileStore before 2.x): harmless
                    pass
        return result
