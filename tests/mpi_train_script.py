"""One rank of a data-parallel training run, for tests/test_parallel.py (run under mpirun).

    mpirun -n 2 python tests/mpi_train_script.py SOLVER [--snapshot STATE] [--overlap] [--timeout S]
                                                       [--trouble fail|hang|stop|snapshot --rank R --at I]

Exits with train_parallel's code. ``--trouble`` makes one rank raise a
DataError, hang, or request a stop or a snapshot at the start of iteration I.
"""
import argparse
import sys
import time
from functools import partial

from caffelite import config
from caffelite.errors import DataError
from caffelite.log import setup_logging
from caffelite.parallel import train_parallel


class _Trouble:
    """At iteration ``at`` on rank ``rank``: raise ("fail"), sleep ("hang"), or ask for a stop or
    a snapshot as a signal handler would, on that rank only ("stop", "snapshot")."""

    def __init__(self, rank, at, kind):
        self.rank, self.at, self.kind = rank, at, kind

    def on_start(self, solver):
        if solver.rank != self.rank or solver.iter != self.at:
            return
        if self.kind == "hang":
            time.sleep(600)
        elif self.kind == "stop":
            solver.request_stop()
        elif self.kind == "snapshot":
            solver.request_snapshot()
        else:
            raise DataError(f"test failure injected at iteration {solver.iter}")


def _body(solver, resume_file, trouble):
    if trouble is not None:
        solver.callbacks.append(trouble)
    solver.solve(resume_file=resume_file)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("solver")
    parser.add_argument("--snapshot", default=None)
    parser.add_argument("--trouble", choices=("fail", "hang", "stop", "snapshot"), default=None)
    parser.add_argument("--rank", type=int, default=1, help="the rank the trouble happens on")
    parser.add_argument("--at", type=int, default=2, help="the iteration it happens at")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    trouble = _Trouble(args.rank, args.at, args.trouble) if args.trouble else None
    param = config.load_solver(args.solver)
    return train_parallel(param, source=args.solver, resume_file=args.snapshot, timeout=args.timeout,
                          overlap=args.overlap or None, body=partial(_body, trouble=trouble))


if __name__ == "__main__":
    sys.exit(main())
