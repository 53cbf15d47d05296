"""A watchdog for blocking collectives: a rank that waits too long stops the whole job.

A dead rank is seen by the launcher (mpirun kills the job when a process dies;
our GPU launcher does the same). A rank that hangs without dying (a stuck
filesystem, a deadlock, a rank that stopped calling collectives) is not: the
others would wait in the all-reduce forever. ``Watchdog.guard`` arms a
deadline around one blocking call; a helper thread fires ``on_timeout`` when
it passes. MPI calls release the GIL, so the thread runs while the main
thread is blocked inside MPI.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager


class Watchdog:
    """``with watchdog.guard("gradient all-reduce", 600): comm.Allreduce(...)``."""

    def __init__(self, on_timeout: Callable[[str, float], None]):
        self.on_timeout = on_timeout
        self._cond = threading.Condition()
        self._what: str | None = None
        self._deadline = 0.0
        self._timeout = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def guard(self, what: str, timeout: float | None):
        if not timeout:
            yield
            return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="caffelite-watchdog", daemon=True)
                self._thread.start()
            self._what, self._timeout = what, float(timeout)
            self._deadline = time.monotonic() + self._timeout
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._what = None  # the thread notices at its next wake-up; no need to wake it

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._what is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                what, timeout = self._what, self._timeout
                self._what = None
                break
            else:
                return
        self.on_timeout(what, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


__all__ = ["Watchdog"]
