"""NCCL through CuPy (``cupy.cuda.nccl``): gradients and parameters between GPUs.

One ``NcclCommunicator`` per process (one process per device), created from a
unique id that rank 0 makes with ``nccl.get_unique_id()`` and shares through
MPI (under mpirun) or through the launcher's queue (``--gpu 0,1``).

All-reduces run on a communication stream of their own: a bucket's all-reduce
waits (on the device) for an event recorded on the compute stream after its
gradients were packed, so backward keeps computing while NCCL moves the
bucket. ``wait`` makes the compute stream wait for the all-reduces; with a
collective timeout the host polls their events and aborts the communicator
(``ncclCommAbort``) when the deadline passes instead of hanging.

Written against CuPy's documented API (NcclCommunicator, get_unique_id,
allReduce, bcast, groupStart/groupEnd, abort, check_async_error).
"""
from __future__ import annotations

import time

import numpy as np

from ..backend import Device, cupy_module
from ..errors import ConfigError, TrainingError


def import_nccl():
    cp = cupy_module()
    try:
        from cupy.cuda import nccl  # noqa: PLC0415 - optional, GPU only
    except ImportError as exc:
        raise ConfigError(f"multi-GPU training needs NCCL, which CuPy cannot load ({exc})",
                          hint="pip install nvidia-nccl-cu12 (CuPy finds it), or train on one GPU") from None
    if not getattr(nccl, "available", True):
        raise ConfigError("multi-GPU training needs NCCL, which CuPy was not built with",
                          hint="pip install nvidia-nccl-cu12, or train on one GPU")
    return cp, nccl


def unique_id():
    """A new NCCL unique id (a tuple of ints: picklable, sent to the other ranks)."""
    _, nccl = import_nccl()
    return nccl.get_unique_id()


class NCCLComm:
    """An NCCL communicator for this process's device, with the collectives the solver needs."""

    name = "NCCL"

    def __init__(self, rank: int, size: int, device: Device, uid):
        self.cp, self.nccl = cp, nccl = import_nccl()
        self.rank, self.size, self.device = rank, size, device
        with cp.cuda.Device(device.id):
            self.comm = nccl.NcclCommunicator(size, uid, rank)
            self.stream = cp.cuda.Stream(non_blocking=True)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}
        self._aborted = False

    def _type(self, array) -> int:
        try:
            return self._types[np.dtype(array.dtype)]
        except KeyError:
            raise ConfigError(f"NCCL cannot reduce {array.dtype} arrays",
                              hint="train in float32, float64 or float16") from None

    # ---- arrays ----------------------------------------------------------------------------
    def start_allreduce_sum(self, array):
        """Sum ``array`` over ranks, in place, on the communication stream; returns its done event."""
        cp = self.cp
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(cp.cuda.get_current_stream())
        self.stream.wait_event(ready)
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._type(array),
                            self.nccl.NCCL_SUM, self.stream.ptr)
        done = cp.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    def wait(self, handles, what: str = "all-reduce", timeout=None) -> None:
        """The compute stream continues after the all-reduces; with a timeout the host checks."""
        if timeout:
            self._poll(handles, what, timeout)
        stream = self.cp.cuda.get_current_stream()
        for done in handles:
            stream.wait_event(done)

    def allreduce_sum_(self, array, what: str = "all-reduce", timeout=None) -> None:
        self.wait([self.start_allreduce_sum(array)], what, timeout)

    def bcast_(self, arrays, root: int = 0, what: str = "broadcast", timeout=None) -> None:
        """Rank ``root``'s values into every rank's ``arrays`` (one NCCL group)."""
        cp, nccl = self.cp, self.nccl
        stream = cp.cuda.get_current_stream()
        nccl.groupStart()
        try:
            for array in arrays:
                self.comm.bcast(array.data.ptr, array.size, self._type(array), root, stream.ptr)
        finally:
            nccl.groupEnd()
        done = cp.cuda.Event(disable_timing=True)
        done.record(stream)
        self._poll([done], what, timeout)

    def _poll(self, events, what: str, timeout) -> None:
        start = time.monotonic()
        deadline = start + timeout if timeout else None
        pause, next_check = 0.0, start + 0.1
        for event in events:
            while not event.done:
                now = time.monotonic()
                if now >= next_check:
                    self.comm.check_async_error()  # raises NcclError when a peer failed
                    next_check = now + 0.1
                if deadline is not None and now > deadline:
                    self.abort()
                    raise TrainingError(
                        f"rank {self.rank} of {self.size} waited more than {timeout:g} s in the "
                        f"{what} (NCCL): another rank has died or hangs",
                        hint="raise CAFFELITE_COLLECTIVE_TIMEOUT if a rank is legitimately that slow")
                time.sleep(pause)
                pause = min(0.002, pause * 2 or 5e-5)

    # ---- failure ---------------------------------------------------------------------------
    def abort(self, code: int | None = None) -> None:
        """ncclCommAbort: pending collectives return, the communicator is unusable."""
        if not self._aborted:
            self._aborted = True
            try:
                self.comm.abort()
            except Exception:  # noqa: BLE001 - aborting is best effort
                pass

    def close(self) -> None:
        if not self._aborted:
            self.stream.synchronize()
            self.comm.destroy()
            self._aborted = True


__all__ = ["NCCLComm", "import_nccl", "unique_id"]
