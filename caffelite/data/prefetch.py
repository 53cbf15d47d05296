"""Background prefetching: a daemon thread keeps ``depth`` batches ready.

Like Caffe's BasePrefetchingDataLayer, batches cycle between a free queue and
a full queue, so at most ``depth`` buffers exist and they are reused. The
worker calls ``load(index, batch)`` for batch indices ``start, start + 1, ...``
in order; a batch's content depends only on its index (readers seek by index,
random transforms draw from a Generator derived from it), so the stream is
the same whatever the timing, and restarting at index k resumes exactly.

An exception in the worker is handed to the consumer: ``next()`` raises it
in the main thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import weakref
from typing import Callable

import numpy as np

log = logging.getLogger("caffelite")

_STOP = object()


class Batch:
    """One prefetch buffer: the batch index and its arrays (reallocated when shapes change)."""

    __slots__ = ("index", "data", "label", "extra")

    def __init__(self):
        self.index = -1
        self.data: np.ndarray | None = None
        self.label: np.ndarray | None = None
        self.extra: dict = {}

    def array(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """The buffer ``name`` with this shape and dtype, reused when it already fits."""
        current = getattr(self, name) if name in ("data", "label") else self.extra.get(name)
        if current is None or current.shape != tuple(shape) or current.dtype != np.dtype(dtype):
            current = np.empty(shape, dtype)
            if name in ("data", "label"):
                setattr(self, name, current)
            else:
                self.extra[name] = current
        return current


class Prefetcher:
    """Runs ``load(index, batch)`` in a daemon thread, ``depth`` batches ahead of ``next()``."""

    def __init__(self, load: Callable[[int, Batch], None], depth: int = 4, start: int = 0,
                 name: str = "prefetch"):
        # A weak reference, so an abandoned layer can be collected and its thread ends.
        self._load = weakref.WeakMethod(load) if hasattr(load, "__self__") else (lambda: load)
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        for _ in range(max(1, int(depth))):
            self._free.put(Batch())
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._warned = False
        self.name = name
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True,
                                        name=f"caffelite-{name}")
        self._thread.start()

    def _run(self, index: int) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._free.get(timeout=1.0)
                except queue.Empty:
                    if self._load() is None:
                        return
                    continue
                if batch is _STOP or self._stop.is_set():
                    return
                load = self._load()
                if load is None:
                    return
                batch.index = index
                load(index, batch)
                del load
                self._full.put(batch)
                index += 1
        except BaseException as exc:  # handed to the consumer, raised there
            self._full.put(exc)

    def next(self) -> Batch:
        """The next batch in order; blocks (logging "Waiting for data" once) when none is ready."""
        if self._error is not None:
            raise self._error
        try:
            item = self._full.get_nowait()
        except queue.Empty:
            if not self._warned:
                log.info("Waiting for data")
                self._warned = True
            item = self._wait()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def _wait(self):
        while True:
            try:
                return self._full.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    # The worker may have queued its last item just before ending.
                    try:
                        return self._full.get_nowait()
                    except queue.Empty:
                        raise RuntimeError(f"the {self.name} prefetch thread has stopped") from None

    def release(self, batch: Batch) -> None:
        """Give a consumed batch's buffers back to the worker."""
        self._free.put(batch)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and wait for it (it finishes the batch it is loading)."""
        self._stop.set()
        self._free.put(_STOP)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
