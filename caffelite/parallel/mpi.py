"""MPI through mpi4py: gradients on CPU-only machines, and the control channel everywhere.

``mpirun -n N caffelite train ...`` (or ``srun``) starts the ranks; this module
joins them. Arrays are all-reduced in place with ``MPI_Allreduce(SUM)``
(``MPI_Iallreduce`` when overlapped with backward); Python values (the seed,
the resume file, the NCCL id) travel with the pickle-based ``bcast``. Every
blocking call runs under a watchdog: past the collective timeout the rank
prints which collective it was waiting in and calls ``MPI_Abort``, which
stops every rank of the job.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np

from ..errors import ConfigError, TrainingError
from .watchdog import Watchdog

EXIT_TIMEOUT = TrainingError.exit_code
#: Seconds between printing why and MPI_Abort, so that the message reaches the terminal.
ABORT_GRACE = 0.5


def import_mpi():
    """mpi4py's MPI module, or a ConfigError that says how to install it."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ConfigError(f"this run was started by mpirun/srun but mpi4py cannot be imported ({exc})",
                          hint="pip install 'caffelite[mpi]' (mpi4py, plus an MPI such as the "
                               "'mpich' wheel or the system's MPI), or set CAFFELITE_MPI=0") from None
    return MPI


def _host(array):
    """(host array, copy back or None): MPI gets NumPy memory; CuPy arrays are staged."""
    if isinstance(array, np.ndarray):
        return array, None
    host = array.get()
    return host, lambda: array.set(host)


class MPIComm:
    """One communicator (default ``COMM_WORLD``) with timed collectives."""

    name = "MPI"

    def __init__(self, comm=None, timeout: float | None = None):
        MPI = self.MPI = import_mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout
        self.watchdog = Watchdog(self._on_timeout)
        self._aborting = False

    # ---- node-local ranks ------------------------------------------------------------------
    def local_rank(self) -> tuple[int, int]:
        """(this rank's index on its node, ranks on its node): picks the GPU under mpirun."""
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    # ---- arrays ----------------------------------------------------------------------------
    def allreduce_sum_(self, array, what: str = "all-reduce", timeout=None) -> None:
        """``array`` (contiguous) becomes the sum over ranks, in place."""
        host, back = _host(array)
        with self.watchdog.guard(what, timeout):
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        if back:
            back()

    def start_allreduce_sum(self, array):
        """Start a non-blocking in-place sum; ``wait`` finishes it."""
        host, back = _host(array)
        return self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM), back

    def wait(self, handles, what: str = "all-reduce", timeout=None) -> None:
        if not handles:
            return
        with self.watchdog.guard(what, timeout):
            self.MPI.Request.Waitall([request for request, _ in handles])
        for _, back in handles:
            if back:
                back()

    def bcast_(self, arrays, root: int = 0, what: str = "broadcast", timeout=None) -> None:
        with self.watchdog.guard(what, timeout):
            for array in arrays:
                host, back = _host(array)
                self.comm.Bcast(host, root=root)
                if back:
                    back()

    # ---- Python values ---------------------------------------------------------------------
    def bcast_object(self, obj, root: int = 0, what: str = "broadcast", timeout=None):
        with self.watchdog.guard(what, timeout):
            return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj, what: str = "all-gather", timeout=None) -> list:
        with self.watchdog.guard(what, timeout):
            return self.comm.allgather(obj)

    def barrier(self, what: str = "barrier", timeout=None) -> None:
        with self.watchdog.guard(what, timeout):
            self.comm.Barrier()

    # ---- failure ---------------------------------------------------------------------------
    def _on_timeout(self, what: str, timeout: float) -> None:
        print(f"caffelite: rank {self.rank} of {self.size} on {socket.gethostname()} waited more "
              f"than {timeout:g} s in the {what}: another rank has died or hangs; stopping every "
              f"rank (raise CAFFELITE_COLLECTIVE_TIMEOUT if a rank is legitimately that slow)",
              file=sys.stderr, flush=True)
        self.abort(EXIT_TIMEOUT)

    def abort(self, code: int) -> None:
        """MPI_Abort on the whole job (never returns when it works)."""
        if self._aborting:
            os._exit(code)
        self._aborting = True
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards our output through its proxies; MPI_Abort tears them down at
        # once, and a message still on its way would be lost.
        time.sleep(ABORT_GRACE)
        try:
            self.comm.Abort(code)
        finally:
            os._exit(code)

    def close(self) -> None:
        self.watchdog.close()


def library_version() -> str:
    """The MPI library's first version line (MPICH, Open MPI, ...)."""
    return import_mpi().Get_library_version().strip().splitlines()[0]


__all__ = ["MPIComm", "import_mpi", "library_version"]
