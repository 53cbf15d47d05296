"""Starting the ranks and stopping them all when one fails.

Two ways in, one per-rank body (``run_rank``):

- under ``mpirun`` / ``srun`` the launcher already started the ranks:
  ``mpi_context`` joins MPI, picks the rank's GPU by its node-local rank
  when ``--gpu`` is given (NCCL id shared through MPI), else trains on the
  CPU with MPI all-reduces;
- ``--gpu 0,1`` / ``all`` without MPI: ``spawn_gpus`` starts one process per
  device ('spawn' start method), rank 0 makes the NCCL id and hands it to
  the others through a queue; the parent watches them.

A failing rank never leaves the others hanging: under MPI it prints its
error and calls MPI_Abort (which stops the job); a spawned rank exits with
its error's code and the parent stops the others and reports it; a rank that
hangs is caught by the collective timeout.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait as wait_for

import numpy as np

from ..backend import CPU, Device, seed_from_clock
from ..errors import CaffeliteError, ConfigError, TrainingError
from .solver import make_parallel_solver
from .world import (LocalControl, ParallelContext, collective_timeout, parse_gpu_spec, quiet_other_ranks,
                    under_mpi)

log = logging.getLogger(__name__)


# ---- contexts -------------------------------------------------------------------------------
def mpi_context(gpu_ids: list[int] | None = None, timeout: float | None = None,
                ctrl=None) -> ParallelContext:
    """This rank's context under mpirun/srun: MPI for control, NCCL (GPUs) or MPI (CPU) for arrays."""
    from .mpi import MPIComm  # noqa: PLC0415

    timeout = collective_timeout(timeout)
    ctrl = ctrl if ctrl is not None else MPIComm(timeout=timeout)
    local_rank, local_size = ctrl.local_rank()
    if not gpu_ids:
        return ParallelContext(comm=ctrl, ctrl=ctrl, device=CPU, local_rank=local_rank, timeout=timeout)
    if local_size > len(gpu_ids):
        raise ConfigError(f"{local_size} ranks run on this node but --gpu names {len(gpu_ids)} "
                          f"device(s)", hint="start one rank per GPU (mpirun -n <GPUs>), or list more devices")
    device = Device.gpu(gpu_ids[local_rank])
    from .nccl import NCCLComm, unique_id  # noqa: PLC0415

    uid = ctrl.bcast_object(unique_id() if ctrl.rank == 0 else None, what="NCCL id broadcast")
    device.xp  # noqa: B018 - makes the device current before NCCL binds to it
    comm = NCCLComm(ctrl.rank, ctrl.size, device, uid)
    return ParallelContext(comm=comm, ctrl=ctrl, device=device, local_rank=local_rank, timeout=timeout)


def nccl_context(rank: int, gpu_ids: list[int], uid, timeout: float | None = None) -> ParallelContext:
    """A spawned rank's context: NCCL for arrays; values were fixed by the parent."""
    from .nccl import NCCLComm  # noqa: PLC0415

    device = Device.gpu(gpu_ids[rank])
    device.xp  # noqa: B018
    comm = NCCLComm(rank, len(gpu_ids), device, uid)
    return ParallelContext(comm=comm, ctrl=LocalControl(rank, len(gpu_ids)), device=device,
                           local_rank=rank, timeout=collective_timeout(timeout))


# ---- one rank -------------------------------------------------------------------------------
def solve(solver, resume_file=None) -> int:
    """The default training body: ``solver.solve(resume_file)``."""
    solver.solve(resume_file=resume_file)
    return 0


def run_rank(param, context: ParallelContext, *, source, resume_file=None, dtype=np.float32, body=None,
             bucket_bytes=None, overlap=None) -> int:
    """Build this rank's solver, run ``body(solver, resume_file)`` (default: solve), close it."""
    solver = make_parallel_solver(param, source=source, context=context, dtype=dtype,
                                  bucket_bytes=bucket_bytes, overlap=overlap)
    try:
        return (body or solve)(solver, resume_file) or 0
    finally:
        solver.close()


def report_failure(exc: BaseException, rank: int, size: int, command: str = "train", debug: bool = False) -> int:
    """Print a rank's error as the command line does (one line unless ``debug``); its exit code."""
    where = f"rank {rank} of {size}"
    if isinstance(exc, CaffeliteError):
        message, code = f"caffelite {command}: error on {where}: {exc}", exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        message, code = f"caffelite: interrupted ({where})", 130
    elif isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 1
        message = f"caffelite {command}: {where} exited with code {code} while the others train"
    else:
        message, code = (f"caffelite {command}: internal error on {where}: {type(exc).__name__}: {exc} "
                         "(rerun with --debug for the traceback, and please report it)"), 1
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(message, file=sys.stderr, flush=True)
    return code


def _abort_job(ctrl, exc: BaseException, debug: bool) -> None:
    """Under MPI: report and MPI_Abort (every rank stops). Ranks other than 0 pause a moment
    first, so that when every rank fails alike (a wrong net file) rank 0's message comes alone."""
    if ctrl.rank != 0:
        time.sleep(1.0)
    code = report_failure(exc, ctrl.rank, ctrl.size, debug=debug)
    ctrl.abort(code)
    os._exit(code)


# ---- entry point ----------------------------------------------------------------------------
def train_parallel(param, *, source: str | None, gpu: str | None = None, resume_file: str | None = None,
                   dtype=np.float32, body=None, timeout: float | None = None,
                   bucket_bytes: int | None = None, overlap: bool | None = None, debug: bool = False) -> int:
    """``caffelite train`` on several processes; returns the exit code (0 on success).

    Under mpirun/srun this process is one rank (CPU, or the GPU of its node-local rank
    among ``--gpu``); otherwise ``--gpu`` with several devices spawns one process per device.
    ``body(solver, resume_file) -> exit code`` trains each rank's solver (default
    ``solver.solve(resume_file)``): the command line passes its own (signal handlers,
    progress, metrics). Spawned ranks receive it pickled: a module-level function or a
    ``functools.partial`` of one. Returns rank 0's exit code (the parent's, when spawning).
    """
    gpu_ids = parse_gpu_spec(gpu)
    options = dict(dtype=dtype, body=body, bucket_bytes=bucket_bytes, overlap=overlap)
    if under_mpi():
        from .mpi import MPIComm  # noqa: PLC0415

        ctrl = MPIComm(timeout=collective_timeout(timeout))
        try:
            context = mpi_context(gpu_ids, timeout, ctrl)
            if context.size == 1:
                log.info("MPI started a single rank: training without data parallelism")
            code = run_rank(param, context, source=source, resume_file=resume_file, **options)
        except BaseException as exc:  # noqa: BLE001 - every failure must stop the other ranks
            if ctrl.size == 1:
                raise
            _abort_job(ctrl, exc, debug)
        context.close()
        return code
    if not gpu_ids or len(gpu_ids) == 1:
        return _train_single(param, source, gpu_ids, resume_file, dtype, body)
    return spawn_gpus(param, gpu_ids, source=source, resume_file=resume_file, timeout=timeout,
                      debug=debug, **options)


def _train_single(param, source, gpu_ids, resume_file, dtype, body) -> int:
    from ..solvers.base import create_solver  # noqa: PLC0415

    device = Device.gpu(gpu_ids[0]) if gpu_ids else None
    solver = create_solver(param, source=source, device=device, dtype=dtype)
    try:
        return (body or solve)(solver, resume_file) or 0
    finally:
        solver.close()


# ---- one process per GPU --------------------------------------------------------------------
def spawn_gpus(param, gpu_ids: list[int], *, source, resume_file=None, timeout=None, debug=False,
               **options) -> int:
    """Train with one spawned process per device in ``gpu_ids``; stop all when one fails."""
    from ..upgrade import upgrade_solver  # noqa: PLC0415

    param = upgrade_solver(param)
    if param.random_seed < 0:  # one seed for every rank, decided here
        param.random_seed = seed_from_clock()
    mp = multiprocessing.get_context("spawn")
    ids = mp.SimpleQueue()
    n = len(gpu_ids)
    level = logging.getLogger("caffelite").getEffectiveLevel()
    procs = [mp.Process(target=_spawned_rank, name=f"caffelite-rank{r}",
                        args=(r, gpu_ids, param.SerializeToString(), source, resume_file, timeout, ids,
                              level, debug, options))
             for r in range(n)]
    for p in procs:
        p.start()
    log.info("Started %d ranks on GPUs %s", n, ", ".join(map(str, gpu_ids)))
    # The ranks run in sessions of their own: Ctrl-C, SIGHUP and SIGTERM reach them once,
    # through this parent, and each rank's handlers decide (stop, snapshot, ...).
    def forward(signum, frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)
    previous = {s: signal.signal(s, forward) for s in _forwarded_signals()}
    try:
        rank, code = _watch(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == 0 or (rank == 0 and code == 128 + signal.SIGTERM):  # 143: stopped by SIGTERM, saved
        return code
    error = TrainingError(f"rank {rank} (GPU {gpu_ids[rank]}) stopped with exit code {code}; "
                          f"the other ranks were stopped", hint="its own message is above")
    error.exit_code = code if code > 0 else TrainingError.exit_code
    raise error


def _forwarded_signals():
    names = ("SIGINT", "SIGHUP", "SIGTERM")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _watch(procs) -> tuple[int, int]:
    """Wait for every rank; on the first failure stop the others. Returns (rank, exit code) of
    the failed rank, else (0, rank 0's exit code)."""
    running = {p.sentinel: (r, p) for r, p in enumerate(procs)}
    while running:
        for sentinel in wait_for(list(running)):
            rank, p = running.pop(sentinel)
            p.join()
            if p.exitcode != 0 and not (rank == 0 and p.exitcode == 128 + signal.SIGTERM):
                _stop(proc for _, proc in running.values())
                return rank, p.exitcode if p.exitcode is not None else 1
    return 0, procs[0].exitcode or 0


def _stop(procs, grace: float = 10.0) -> None:
    procs = list(procs)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _spawned_rank(rank, gpu_ids, param_bytes, source, resume_file, timeout, ids, level, debug, options):
    """Body of a spawned rank (a fresh interpreter)."""
    from ..log import setup_logging  # noqa: PLC0415
    from ..proto import pb  # noqa: PLC0415

    setup_logging(level=level)
    quiet_other_ranks(rank)
    if hasattr(os, "setsid"):
        os.setsid()  # signals come through the parent only (see spawn_gpus)
    _exit_with_parent()
    n = len(gpu_ids)
    try:
        if rank == 0:
            from .nccl import unique_id  # noqa: PLC0415

            uid = unique_id()
            for _ in range(n - 1):
                ids.put(uid)
        else:
            uid = ids.get()
        context = nccl_context(rank, gpu_ids, uid, timeout)
        param = pb.SolverParameter()
        param.ParseFromString(param_bytes)
        code = run_rank(param, context, source=source, resume_file=resume_file, **options)
        context.close()
    except BaseException as exc:  # noqa: BLE001
        sys.exit(report_failure(exc, rank, n, debug=debug))
    sys.exit(code)


__all__ = ["train_parallel", "mpi_context", "nccl_context", "run_rank", "spawn_gpus", "report_failure", "solve"]


def _exit_with_parent() -> None:
    """A spawned rank whose parent died (killed) exits instead of training on alone."""
    import threading  # noqa: PLC0415

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="caffelite-parent-watch", daemon=True).start()
