"""Host memory, through psutil: what is available now (an async save's snapshot is checked
against it) and the peak resident memory over a block of code (tests and benchmarks)."""

from __future__ import annotations

import threading

import psutil


def available_bytes() -> int:
    """Bytes of host memory available to new allocations without swapping:
    psutil.virtual_memory().available (on Linux, MemAvailable: free memory plus reclaimable cache)."""
    return psutil.virtual_memory().available


class PeakRSS:
    """with PeakRSS() as m: ...; then m.base, m.peak and m.extra (peak - base), in bytes.

    Args:
        interval: seconds between samples of the resident set size (a thread samples it).
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self._proc = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def extra(self) -> int:
        """Bytes the block added at its peak: peak - base (0 if it freed more than it took)."""
        return max(0, self.peak - self.base)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
