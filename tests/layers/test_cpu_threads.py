"""cpu_threads: parts of a layer's CPU work on several threads."""
import threading

import numpy as np
import pytest

from caffelite.layers import cpu_threads
from caffelite.layers.im2col import ARENA


@pytest.mark.parametrize("env, expected", [({"OMP_NUM_THREADS": "3"}, 3),
                                           ({"OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "5"}, 5),
                                           ({"OMP_NUM_THREADS": "x", "OPENBLAS_NUM_THREADS": "2"}, 2)])
def test_thread_count_follows_blas_settings(monkeypatch, env, expected):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpu_threads.cpu_threads() == expected


@pytest.mark.parametrize("count, each, threads, parts", [
    (10, 1 << 20, 4, 4),      # one part per thread
    (3, 1 << 20, 4, 3),       # no more parts than items
    (100, 1000, 4, 1),        # 100k elements: one part of at least MIN_PART_ELEMENTS...
    (100, 2000, 4, 3),        # ...200k: three
    (7, 1 << 20, 1, 1)])
def test_split_covers_the_items_in_contiguous_parts(monkeypatch, count, each, threads, parts):
    monkeypatch.setattr(cpu_threads, "cpu_threads", lambda: threads)
    monkeypatch.setattr(cpu_threads, "MIN_PART_ELEMENTS", 1 << 16)
    got = cpu_threads.split(count, each)
    assert len(got) == parts
    assert got[0][0] == 0 and got[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    sizes = [stop - start for start, stop in got]
    assert max(sizes) - min(sizes) <= 1


def test_run_parts_runs_every_part_on_several_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_threads", lambda: 3)
    out = np.zeros(9)
    seen = set()
    barrier = threading.Barrier(3, timeout=10)   # all three parts must be running at once

    def part(bounds):
        seen.add(threading.get_ident())
        barrier.wait()
        out[slice(*bounds)] = np.arange(*bounds)

    cpu_threads.run_parts(part, [(0, 3), (3, 6), (6, 9)])
    np.testing.assert_array_equal(out, np.arange(9))
    assert len(seen) == 3 and threading.get_ident() in seen


def test_run_parts_waits_for_all_parts_then_raises(monkeypatch):
    monkeypatch.setattr(cpu_threads, "cpu_threads", lambda: 2)
    done = []

    def part(bounds):
        if bounds[0] == 0:
            raise ValueError("part 0 failed")
        done.append(bounds)

    with pytest.raises(ValueError, match="part 0 failed"):
        cpu_threads.run_parts(part, [(0, 1), (1, 2)])
    assert done == [(1, 2)]


def test_a_part_cannot_take_scratch_of_its_own(monkeypatch):
    """Parts slice the caller's scratch; a worker thread has no arena scope."""
    monkeypatch.setattr(cpu_threads, "cpu_threads", lambda: 2)
    with ARENA.scope(), pytest.raises(RuntimeError, match="outside Arena.scope"):
        cpu_threads.run_parts(lambda bounds: ARENA.get((4,), np.float32), [(0, 1), (1, 2)])
