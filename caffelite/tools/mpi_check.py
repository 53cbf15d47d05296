"""``caffelite mpi_check``: is data-parallel training going to work here?

Run it the way training will run (``mpirun -n 4 caffelite mpi_check``,
``srun caffelite mpi_check --gpu all``, or plainly). Rank 0 prints every
rank's host, node-local rank and device, the MPI library, then checks an
all-reduce (values and bandwidth) over MPI, and over NCCL with ``--gpu``.
Without mpirun it checks a one-rank NCCL communicator on the first ``--gpu``.
"""
from __future__ import annotations

import socket
import time

COMMAND = "mpi_check"
HELP = "check MPI / NCCL for multi-process training (run it under mpirun or srun)"


def add_arguments(parser) -> None:
    parser.add_argument("--gpu", "-gpu", default=None, help="also check NCCL on these devices (ids or 'all')")
    parser.add_argument("--mb", type=float, default=16.0, help="all-reduce size in MiB (default 16)")
    parser.add_argument("--repeat", type=int, default=5, help="timed all-reduces (default 5)")


def _check(comm, array, xp, repeat: int, sync) -> tuple[bool, float]:
    """Sum of (rank + 1) over ranks everywhere? Returns (correct, GB/s of algorithm bandwidth)."""
    expected = comm.size * (comm.size + 1) / 2
    array[...] = comm.rank + 1
    comm.allreduce_sum_(array, "check all-reduce", 120)
    sync()
    ok = bool(xp.all(array == expected))
    start = time.perf_counter()
    for _ in range(repeat):
        comm.allreduce_sum_(array, "timed all-reduce", 120)
    sync()
    seconds = (time.perf_counter() - start) / max(repeat, 1)
    return ok, array.nbytes / seconds / 1e9


def run(args) -> int:
    import numpy as np  # noqa: PLC0415

    from ..parallel.world import parse_gpu_spec, under_mpi  # noqa: PLC0415

    gpu_ids = parse_gpu_spec(args.gpu)
    n = max(1, int(args.mb * (1 << 20) / 4))
    if not under_mpi():
        print("not started by mpirun/srun: one rank.")
        try:
            from ..parallel.mpi import library_version  # noqa: PLC0415

            print(f"mpi4py: available, {library_version()}")
        except Exception as exc:  # noqa: BLE001 - a report, not a failure
            print(f"mpi4py: not usable ({exc})")
        if gpu_ids:
            return _one_rank_nccl(gpu_ids[0], n, args.repeat)
        return 0

    from ..parallel.launcher import mpi_context  # noqa: PLC0415
    from ..parallel.mpi import MPIComm, library_version  # noqa: PLC0415

    ctrl = MPIComm(timeout=120)
    ctx = mpi_context(gpu_ids, 120, ctrl)
    me = (ctrl.rank, socket.gethostname(), ctx.local_rank, repr(ctx.device))
    everyone = ctrl.allgather_object(me, "rank list")
    ok, speed = _check(ctrl, np.empty(n, np.float32), np, args.repeat, lambda: None)
    results = [("MPI", ok, speed)]
    if gpu_ids:
        cp = ctx.device.xp
        ok, speed = _check(ctx.comm, cp.empty(n, cp.float32), cp, args.repeat,
                           cp.cuda.get_current_stream().synchronize)
        results.append(("NCCL", ok, speed))
    all_ok = all(ctrl.allgather_object(all(r[1] for r in results), "result"))
    if ctrl.rank == 0:
        print(f"{library_version()}; {ctrl.size} ranks")
        for rank, host, local, device in everyone:
            print(f"  rank {rank}: host {host}, local rank {local}, device {device}")
        for name, good, gbps in results:
            print(f"{name} all-reduce of {args.mb:g} MiB: {'correct' if good else 'WRONG'}, "
                  f"{gbps:.2f} GB/s (rank 0's view)")
        print("OK" if all_ok else "FAILED: some rank got a wrong sum")
    ctx.close()
    return 0 if all_ok else 1


def _one_rank_nccl(device_id: int, n: int, repeat: int) -> int:
    from ..backend import Device  # noqa: PLC0415
    from ..parallel.nccl import NCCLComm, unique_id  # noqa: PLC0415

    device = Device.gpu(device_id)
    cp = device.xp
    comm = NCCLComm(0, 1, device, unique_id())
    ok, speed = _check(comm, cp.empty(n, cp.float32), cp, repeat, cp.cuda.get_current_stream().synchronize)
    comm.close()
    print(f"NCCL one-rank communicator on GPU {device_id}: all-reduce {'correct' if ok else 'WRONG'}, "
          f"{speed:.2f} GB/s")
    return 0 if ok else 1

