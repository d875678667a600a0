"""Peak resident memory of this process over a block of code (psutil, sampled in a thread)."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """with PeakRSS() as m: ...; then m.base, m.peak and m.extra (peak - base), in bytes."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self._proc = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def extra(self) -> int:
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
