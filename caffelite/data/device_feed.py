"""Batches to a GPU: page-locked host buffers, copied on a stream of their own.

The prefetch workers fill page-locked ("pinned") host buffers (``allocate``), so a copy to the
GPU runs asynchronously by DMA. ``put`` copies a batch on the feed's own stream into one of two
device staging buffers (while the GPU may still be computing the previous iteration), and makes
the compute stream wait for that copy and move the batch into the top blob's own memory: the
top keeps its address (a CUDA graph replay reads it there), and the staging buffer is not
overwritten before the compute stream has read it. ``wait_copied`` returns once the last host
buffer may be reused.
"""
from __future__ import annotations

import numpy as np

from ..backend import cupy_module


def pinned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised NumPy array in page-locked memory (plain memory if that fails)."""
    import cupyx  # noqa: PLC0415 - GPU only

    try:
        return cupyx.empty_pinned(shape, dtype)
    except Exception:  # noqa: BLE001 - page-locked memory is an optimisation, not a need
        return np.empty(shape, dtype)


class DeviceFeed:
    """The host-to-GPU copies of one data layer (module doc)."""

    allocate = staticmethod(pinned_empty)

    def __init__(self):
        self.cp = cupy_module()
        self.stream = self.cp.cuda.Stream(non_blocking=True)
        self._staging: dict = {}  # (top, parity) -> device buffer
        self._read: dict = {}     # (top, parity) -> event: the compute stream has read it
        self._copied = []         # the copies since wait_copied, on the feed's stream
        self._turns: dict = {}

    def put(self, top: int, blob, host: np.ndarray) -> None:
        """Top ``top``'s blob.data[...] = host, through the copy stream (module doc)."""
        cp = self.cp
        turn = self._turns.get(top, 0)
        self._turns[top] = turn + 1
        key = (top, turn % 2)
        compute = cp.cuda.get_current_stream()
        staging = self._staging.get(key)
        if staging is None or staging.shape != host.shape or staging.dtype != host.dtype:
            staging = self._staging[key] = cp.empty(host.shape, host.dtype)
        if key in self._read:
            self.stream.wait_event(self._read[key])
        staging.set(host, stream=self.stream)
        copied = self.stream.record()
        self._copied.append(copied)
        compute.wait_event(copied)
        blob.data[...] = staging
        self._read[key] = compute.record()

    def wait_copied(self) -> None:
        for event in self._copied:
            event.synchronize()
        self._copied = []


__all__ = ["DeviceFeed", "pinned_empty"]
