"""Async saves: the handle and the one-at-a-time rule."""

from __future__ import annotations

import logging
import threading


log = logging.getLogger("dist_saver")

_pending: "AsyncSave | None" = None


class AsyncSave:
    """A save running in the background. wait() returns its SaveResult or raises its error."""

    def __init__(self, blocking_seconds: float):
        self.blocking_seconds = blocking_seconds  # how long dist_save held the caller
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, fn, args: tuple, blocking_seconds: float) -> "AsyncSave":
        global _pending
        handle = cls(blocking_seconds)

        def run():
            try:
                handle._result = fn(*args)
            except BaseException as e:  # raised again by wait(), on the caller's thread
                handle._error = e
            finally:
                handle._done.set()

        handle._thread = threading.Thread(target=run, name="dist_saver-async-save", daemon=True)
        _pending = handle
        handle._thread.start()
        return handle

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"async save still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result


def wait_for_pending_save() -> None:
    """Saves run one at a time: a new one waits for the previous async save to finish."""
    global _pending
    handle, _pending = _pending, None
    if handle is None:
        return
    handle._done.wait()
    if handle._error is not None:  # its owner sees it from wait(); don't lose it if they never ask
        log.error("a previous async save failed: %s", handle._error)
