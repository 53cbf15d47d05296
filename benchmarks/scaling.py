"""Data-parallel scaling on the CPU: LeNet on 1 and 2 MPI processes, throughput and efficiency.

Trains LeNet (configs/lenet, batch 64 per rank, SGD momentum, "inv" policy)
on the MNIST LMDB of ../shared/fixtures/caffe/mnist and times ``solver.step``
after a warm-up. Runs, each in fresh processes:

- 1 process, 1 BLAS/OpenMP thread            (the per-core baseline)
- 1 process, 2 threads                        (what the second core gives without MPI)
- 2 MPI processes x 1 thread, batch 64 each   (Caffe's -gpu 0,1 semantics: effective batch 128)
- 2 MPI processes x 1 thread, batch 32 each   (same effective batch as one process: strong scaling)

Efficiency = images/s of N ranks / (N x images/s of 1 rank with 1 thread).

    pip install mpich mpi4py      # or a system MPI + mpi4py
    python benchmarks/scaling.py [--iters 150] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LMDB = REPO.parent / "shared" / "fixtures" / "caffe" / "mnist" / "mnist_train_lmdb"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---- one rank ---------------------------------------------------------------------------------
def worker(iters: int, batch: int) -> None:
    sys.path.insert(0, str(REPO))
    from caffelite import config
    from caffelite.parallel import make_parallel_solver, mpi_context, under_mpi
    from caffelite.solvers.base import create_solver

    net = config.load_net(REPO / "configs" / "lenet" / "lenet_train_test.yaml")
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = str(LMDB)
            layer.data_param.batch_size = batch
    param = config.load_solver(REPO / "configs" / "lenet" / "lenet_solver.yaml")
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    for name in ("test_iter", "test_interval", "snapshot", "display"):
        param.ClearField(name)
    param.snapshot_after_train = False
    param.max_iter = 10 ** 9
    if under_mpi():
        ctx = mpi_context()
        solver = make_parallel_solver(param, source=None, context=ctx)
        barrier, rank, world = ctx.comm.barrier, ctx.rank, ctx.size
    else:
        solver = create_solver(param)
        barrier, rank, world = (lambda: None), 0, 1
    solver.step(10)  # warm-up: buffers, prefetch, the start-up broadcast
    barrier()
    start = time.perf_counter()
    solver.step(iters)
    barrier()
    elapsed = time.perf_counter() - start
    solver.close()
    if rank == 0:
        print("RESULT " + json.dumps({"iters": iters, "seconds": elapsed, "batch": batch, "world": world}),
              flush=True)


# ---- the driver -------------------------------------------------------------------------------
def _mpirun() -> str | None:
    for name in ("mpirun", "mpiexec"):
        beside = Path(sys.executable).with_name(name)
        if beside.exists():
            return str(beside)
        if shutil.which(name):
            return shutil.which(name)
    return None


def run(ranks: int, threads: int, batch: int, iters: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env.update({v: str(threads) for v in THREAD_VARS})
    env.update(CAFFELITE_DATA_WORKERS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, __file__, "--worker", "--iters", str(iters), "--batch", str(batch)]
    if ranks > 1:
        cmd = [_mpirun(), "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    result["iter_s"] = result["iters"] / result["seconds"]
    result["images_s"] = result["iter_s"] * result["batch"] * result["world"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.iters, args.batch)
        return
    if _mpirun() is None:
        raise SystemExit("needs mpirun and mpi4py: pip install mpich mpi4py")
    b = args.batch
    configs = [("1 process  x 1 thread ", 1, 1, b), ("1 process  x 2 threads", 1, 2, b),
               ("2 processes x 1 thread", 2, 1, b), ("2 processes x 1 thread", 2, 1, b // 2)]
    load_before = os.getloadavg()[0]
    samples: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for _ in range(args.reps):  # interleaved, so drifts in machine load hit every configuration
        for i, (_, ranks, threads, batch) in enumerate(configs):
            samples[i].append(run(ranks, threads, batch, args.iters))
    print(f"LeNet, MNIST LMDB, {args.iters} timed iterations, median of {args.reps} runs, "
          f"{os.cpu_count()} CPUs (1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after: other work on the machine skews every number)")
    print(f"{'configuration':<26}{'batch/rank':>11}{'eff. batch':>11}{'iter/s':>9}{'images/s':>10}"
          f"{'vs 1x1':>8}{'efficiency':>12}")
    base = statistics.median(r["images_s"] for r in samples[0])
    for i, (label, ranks, threads, batch) in enumerate(configs):
        iter_s = statistics.median(r["iter_s"] for r in samples[i])
        images_s = statistics.median(r["images_s"] for r in samples[i])
        workers = ranks * threads
        print(f"{label:<26}{batch:>11}{batch * ranks:>11}{iter_s:>9.1f}{images_s:>10.0f}"
              f"{images_s / base:>7.2f}x{images_s / (workers * base):>11.0%}")
    two_threads = statistics.median(r["images_s"] for r in samples[1])
    two_ranks = statistics.median(r["images_s"] for r in samples[2])
    print(f"2 MPI ranks vs 1 process with 2 threads: {two_ranks / two_threads:.2f}x the images/s")


if __name__ == "__main__":
    main()
