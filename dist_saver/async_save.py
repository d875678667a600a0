"""Async saves: the handle (a concurrent.futures.Future) and the one-at-a-time rule."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

log = logging.getLogger("dist_saver")

_pending: "AsyncSave | None" = None


class AsyncSave(concurrent.futures.Future):
    """A save running in the background: a concurrent.futures.Future of its SaveResult.

    Returned by dist_save(..., async_save=True) once this rank's tensors are copied to host memory.
    As a Future it works with concurrent.futures.wait/as_completed and add_done_callback; done(),
    result() and exception() behave as for any Future. It cannot be cancelled (it runs from the
    start: cancel() returns False).

    Attributes:
        blocking_seconds (float): how long dist_save held the caller before returning it.
    """

    def __init__(self, blocking_seconds: float = 0.0):
        super().__init__()
        self.blocking_seconds = blocking_seconds
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, fn, args: tuple, blocking_seconds: float) -> "AsyncSave":
        """Run fn(*args) in a daemon thread; its return value or exception completes the handle,
        which becomes the pending save that the next dist_save waits for. Returns the handle."""
        global _pending
        handle = cls(blocking_seconds)
        handle.set_running_or_notify_cancel()  # running from now: cancel() returns False

        def run():
            try:
                handle.set_result(fn(*args))
            except BaseException as e:  # raised again by wait()/result(), on the caller's thread
                handle.set_exception(e)

        handle._thread = threading.Thread(target=run, name="dist_saver-async-save", daemon=True)
        _pending = handle
        handle._thread.start()
        return handle

    def wait(self, timeout: float | None = None):
        """Wait for the save to finish (up to timeout seconds; None: as long as it takes).

        Returns: the SaveResult (the same as result()).
        Raises: the save's error (a SaveError from any rank, CollectiveError, PlanError, ...);
        TimeoutError if it is still running after timeout seconds (it goes on running).
        """
        # Not result(timeout): a TimeoutError raised by the save itself must not read as "still running".
        if not concurrent.futures.wait([self], timeout).done:
            raise TimeoutError(f"async save still running after {timeout}s")
        return self.result()


def wait_for_pending_save() -> None:
    """Saves run one at a time: a new one waits for the previous async save to finish."""
    global _pending
    handle, _pending = _pending, None
    if handle is None:
        return
    error = handle.exception()  # waits for it to finish
    if error is not None:  # its owner sees it from wait(); don't lose it if they never ask
        log.error("a previous async save failed: %s", error)
