"""A data-parallel solver: any solver type, one replica per rank.

``make_parallel_solver`` builds rank r's solver with ``rank`` / ``world_size``
(its data layers read records r, r + N, ... in TRAIN), attaches a
``GradientSync`` and wraps the solver class so that

- only rank 0 tests and snapshots (Caffe's rule), and only rank 0 logs progress;
- stop / snapshot requests (signals) take effect on every rank in the same
  iteration (they are agreed on through the gradient all-reduce);
- a resume file is rank 0's, broadcast, and must be readable by every rank;
- the random seed is rank 0's (``random_seed: -1`` included), so every rank
  derives its streams from the same seed (rank r uses seed + r, as Caffe).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..backend import seed_from_clock
from ..errors import DataError
from ..proto import pb
from ..registry import SOLVERS
from ..upgrade import upgrade_solver
from .sync import GradientSync
from .world import quiet_other_ranks

log = logging.getLogger(__name__)


class ParallelSolverMixin:
    """Overrides for rank-aware testing, snapshots, requests and resume (see the module doc)."""

    parallel = None  # ParallelContext
    sync: GradientSync | None = None

    def solve(self, resume_file: str | None = None) -> None:
        ctx = self.parallel
        resume_file = ctx.ctrl.bcast_object(os.fspath(resume_file) if resume_file else None,
                                            what="resume file broadcast")
        if resume_file:
            readable = ctx.ctrl.allgather_object(os.path.isfile(resume_file), what="resume file check")
            missing = [r for r, ok in enumerate(readable) if not ok]
            if missing:
                raise DataError(f"rank(s) {', '.join(map(str, missing))} cannot read the snapshot "
                                f"'{resume_file}'", hint="resuming needs the snapshot on a filesystem "
                                "every rank sees (a shared home, project or scratch folder)")
        if ctx.is_root:
            batch = _train_batch_size(self.net)
            log.info("Data parallel training on %d ranks%s", ctx.size,
                     f"; effective batch size {batch} x {ctx.size} = {batch * ctx.size}" if batch else "")
        super().solve(resume_file)

    def take_requests(self) -> tuple[bool, bool]:
        return self.sync.take_requests()



_CLASSES: dict[type, type] = {}


def parallel_solver_class(base: type) -> type:
    """``Parallel<Base>``: the solver type ``base`` with the data-parallel overrides."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Parallel{base.__name__}", (ParallelSolverMixin, base),
                                    {"__module__": __name__, "__doc__": base.__doc__})
    return cls


def agree_on_seed(param, ctrl) -> pb.SolverParameter:
    """A copy of ``param`` whose random_seed is rank 0's (drawn from the clock when it is -1)."""
    out = pb.SolverParameter()
    out.CopyFrom(param)
    seed = out.random_seed if out.random_seed >= 0 else seed_from_clock()
    out.random_seed = int(ctrl.bcast_object(int(seed), what="seed broadcast"))
    return out


def make_parallel_solver(param, *, source: str | None, context, dtype=np.float32,
                         bucket_bytes: int | None = None, overlap: bool | None = None):
    """Rank ``context.rank``'s solver for ``param`` (a SolverParameter), ready to ``solve()``.

    ``context`` is a ``ParallelContext`` (see ``parallel.mpi_context`` / the GPU launcher).
    """
    quiet_other_ranks(context.rank)
    param = agree_on_seed(upgrade_solver(param), context.ctrl)
    cls = parallel_solver_class(SOLVERS.get(param.type))
    solver = cls(param, source=source, device=context.device, dtype=dtype, rank=context.rank,
                 world_size=context.size)
    solver.parallel = context
    solver.sync = GradientSync(context, solver, bucket_bytes=bucket_bytes, overlap=overlap)
    # First: other callbacks (diagnostics) must see the reduced gradients.
    solver.callbacks.insert(0, solver.sync)
    return solver


def _train_batch_size(net) -> int | None:
    sizes = [layer.batch_size for layer in net.layers if isinstance(getattr(layer, "batch_size", None), int)]
    return sizes[0] if sizes else None


__all__ = ["make_parallel_solver", "parallel_solver_class", "ParallelSolverMixin", "agree_on_seed"]
