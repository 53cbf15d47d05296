"""Who the ranks are: MPI detection from the environment, ``--gpu`` parsing, the context.

A process learns that it is one rank of several without importing mpi4py:
every launcher sets the world size in the environment (``PMI_SIZE`` for
MPICH, Intel MPI and ``srun --mpi=pmi2``; ``OMPI_COMM_WORLD_SIZE`` for Open
MPI; ``SLURM_STEP_NUM_TASKS`` inside an ``srun`` step; ``MV2_COMM_WORLD_SIZE``
for MVAPICH). ``CAFFELITE_MPI=1`` forces MPI on, ``CAFFELITE_MPI=0`` off.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..backend import Device
from ..errors import ConfigError

log = logging.getLogger(__name__)

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
#: Seconds a rank waits in one collective before it declares the others dead or stuck.
DEFAULT_TIMEOUT = 600.0


def mpi_world_size(environ=os.environ) -> int:
    """The number of ranks the launcher started (1 when not under mpirun/srun)."""
    forced = environ.get("CAFFELITE_MPI", "").strip()
    if forced == "0":
        return 1
    for name in SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value)
    # Forced on but no size in the environment: MPI itself will tell (possibly 1).
    return -1 if forced == "1" else 1


RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def env_rank(environ=os.environ) -> int:
    """This process's rank as the launcher announced it (0 when not under mpirun/srun): lets the
    command line quiet the other ranks' log before MPI is even imported."""
    if not under_mpi(environ):
        return 0
    for name in RANK_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def under_mpi(environ=os.environ) -> bool:
    return mpi_world_size(environ) != 1


def collective_timeout(value: float | None = None, environ=os.environ) -> float | None:
    """``value``, else ``$CAFFELITE_COLLECTIVE_TIMEOUT``, else 600 s; 0 or less = wait forever."""
    if value is None:
        text = environ.get("CAFFELITE_COLLECTIVE_TIMEOUT", "").strip()
        try:
            value = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise ConfigError(f"CAFFELITE_COLLECTIVE_TIMEOUT='{text}' is not a number of seconds",
                              hint="e.g. CAFFELITE_COLLECTIVE_TIMEOUT=900, or 0 to wait forever") from None
    return float(value) if value and value > 0 else None


def parse_gpu_spec(spec: str | None, device_count=None) -> list[int] | None:
    """``--gpu`` -> device ids: None for the CPU, ``"0,1"`` -> [0, 1], ``"all"`` -> every device.

    ``device_count`` (a function) is called only for ``all``.
    """
    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    if spec == "all":
        if device_count is None:
            from ..backend import cupy_module, gpu_available  # noqa: PLC0415

            def device_count():
                return cupy_module().cuda.runtime.getDeviceCount() if gpu_available() else 0
        n = device_count()
        if n < 1:
            raise ConfigError("--gpu all: no GPU found", hint="run without --gpu to use the CPU")
        return list(range(n))
    ids = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise ConfigError(f"--gpu '{spec}' is not a list of device ids",
                              hint="for example --gpu 0, --gpu 0,1 or --gpu all")
        ids.append(int(part))
    if not ids:
        raise ConfigError(f"--gpu '{spec}' names no device", hint="for example --gpu 0,1")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpu {spec} names a device twice",
                          hint="one process per device: list each id once")
    return ids


def parallel_requested(gpu_spec: str | None, environ=os.environ) -> bool:
    """True when training needs several processes: under mpirun/srun, or ``--gpu`` lists several
    devices (``all`` counts as several: one process per device, even when there is only one)."""
    if under_mpi(environ):
        return True
    if gpu_spec is None:
        return False
    spec = str(gpu_spec).strip()
    return spec == "all" or len([s for s in spec.split(",") if s.strip()]) > 1


class LocalControl:
    """Control messages for ranks started by our own launcher: the parent decided every value
    (seed, resume file) before starting them, so a "broadcast" returns the value as it is."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def bcast_object(self, obj, root: int = 0, what: str = "", timeout=None):
        return obj

    def allgather_object(self, obj, what: str = "", timeout=None) -> list:
        return [obj] * self.size


@dataclass
class ParallelContext:
    """One rank's view: the communicator for arrays (``comm``: NCCL on GPUs, MPI on CPUs),
    the one for Python values (``ctrl``: MPI, or ``LocalControl``), and its device."""

    comm: object
    ctrl: object
    device: Device
    local_rank: int = 0
    timeout: float | None = DEFAULT_TIMEOUT
    options: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def abort(self, code: int) -> None:
        """Stop every rank (MPI_Abort / ncclCommAbort + exit)."""
        for c in (self.comm, self.ctrl):
            abort = getattr(c, "abort", None)
            if abort is not None:
                abort(code)

    def close(self) -> None:
        for c in {id(self.comm): self.comm, id(self.ctrl): self.ctrl}.values():
            close = getattr(c, "close", None)
            if close is not None:
                close()


def quiet_other_ranks(rank: int) -> None:
    """Only rank 0 logs progress, as in Caffe; the others keep warnings and errors."""
    if rank != 0:
        logging.getLogger("caffelite").setLevel(logging.WARNING)


__all__ = ["mpi_world_size", "under_mpi", "env_rank", "parse_gpu_spec", "parallel_requested", "collective_timeout",
           "ParallelContext", "LocalControl", "quiet_other_ranks", "DEFAULT_TIMEOUT"]
