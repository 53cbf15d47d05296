"""A CPU layer's independent parts run on all the cores at once.

BLAS uses every core, but a NumPy pass runs on one. A layer whose time goes to
such passes (pooling, LRN) cuts its work into parts with disjoint outputs and
hands them to ``run_parts``: the calling thread runs the first part, worker
threads the others, and NumPy lets go of the GIL inside its loops, so the parts
overlap. The caller takes all scratch from its arena (im2col.ARENA) before, and
each part works in its slice of it, so parts cost no more memory than one call;
a worker thread has no arena scope, so a part that asks the arena itself fails.

The thread count is what BLAS is told, ``OMP_NUM_THREADS`` or
``OPENBLAS_NUM_THREADS``, else the number of CPUs this process may run on.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

#: Parts have at least this many elements. Measured on 2 cores, same process, alternating:
#: CIFAR-10 quick's pool2 (819k elements in all) gains from two parts; LeNet's pool1 (737k) and
#: conv2 products (537k) lose, as its data layer's decode threads want the cores too (LeNet
#: training 78.4 iter/s with parts from 64k elements, 81.2 with none, 81.9 with this bound).
MIN_PART_ELEMENTS = 3 << 17

_lock = threading.Lock()
_pool: tuple | None = None   # (pid, workers, pool): a forked child makes its own


def cpu_threads() -> int:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # (not on Linux)
        return os.cpu_count() or 1


def split(count: int, elements_each: int) -> list[tuple[int, int]]:
    """``count`` items (planes) of ``elements_each`` elements as contiguous (start, stop)
    parts, one per thread, each at least MIN_PART_ELEMENTS elements (one part if small)."""
    parts = max(1, min(cpu_threads(), count, count * elements_each // max(1, MIN_PART_ELEMENTS)))
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_parts(fn, parts) -> None:
    """fn(part) for every part, at once; returns when all are done, raising the first error.
    Not from inside a part: a worker waiting on its own pool could wait forever."""
    parts = list(parts)
    if len(parts) <= 1:
        for part in parts:
            fn(part)
        return
    pool = _workers(len(parts) - 1)
    futures = [pool.submit(fn, part) for part in parts[1:]]
    try:
        fn(parts[0])
    finally:
        wait(futures)
    for future in futures:
        future.result()


def _workers(count: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < count:
            workers = max(count, cpu_threads() - 1)
            _pool = (os.getpid(), workers,
                     ThreadPoolExecutor(workers, thread_name_prefix="caffelite-cpu"))
        return _pool[2]
