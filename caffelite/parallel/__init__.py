"""Data-parallel training on several GPUs and several machines (NCCL, MPI), as Caffe's ``-gpu 0,1``.

Every rank holds a full replica of the net and reads its own slice of the
training data (rank r of N: records r, r + N, ...); rank 0's parameters are
broadcast at the start; after each backward the gradients are summed over
the ranks and scaled by 1/N, so the update is that of one batch of
N x batch_size; only rank 0 logs, tests and snapshots.

- ``mpirun -n N caffelite train --solver S`` (or ``srun``): CPU ranks, gradients
  all-reduced with MPI (mpi4py). With ``--gpu``, each rank drives the GPU of its
  node-local rank and gradients go through NCCL (MPI shares the NCCL id).
- ``caffelite train --solver S --gpu 0,1`` (or ``all``): one spawned process per GPU, NCCL.

Modules: ``world`` (detection, ``--gpu`` parsing, the per-rank context),
``mpi`` / ``nccl`` (communicators), ``sync`` (the gradient all-reduce callback),
``solver`` (the rank-aware solver), ``launcher`` (starting and stopping ranks),
``watchdog`` (collective timeouts).
"""
from .launcher import mpi_context, nccl_context, run_rank, spawn_gpus, train_parallel
from .solver import make_parallel_solver
from .sync import GradientSync
from .world import (LocalControl, ParallelContext, collective_timeout, env_rank, mpi_world_size,
                    parallel_requested, parse_gpu_spec, quiet_other_ranks, under_mpi)

__all__ = ["train_parallel", "parallel_requested", "make_parallel_solver", "mpi_context", "nccl_context",
           "run_rank", "spawn_gpus", "GradientSync", "ParallelContext", "LocalControl", "parse_gpu_spec",
           "mpi_world_size", "under_mpi", "env_rank", "quiet_other_ranks", "collective_timeout"]
