"""Signals while training, resuming with --snapshot auto, and snapshot_keep."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from caffelite.cli import main
from caffelite.io.weights import load_weights
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.solvers.snapshots import check_complete, latest_snapshot, list_snapshots

REPO = Path(__file__).resolve().parents[1]

LAYERS = '''
import os
import signal
import time

from caffelite.layers.base import Layer


class Pace(Layer):
    """Identity. Sleeps CAFFELITE_TEST_SLEEP seconds per forward; CAFFELITE_TEST_SELF_SIGNALS
    ("INT@15,HUP@20") sends those signals to its own process at those forward calls."""
    num_bottom = 1
    num_top = 1

    def setup(self, bottom, top):
        self.sleep = float(os.environ.get("CAFFELITE_TEST_SLEEP", "0"))
        self.signals = [item.split("@") for item in
                        os.environ.get("CAFFELITE_TEST_SELF_SIGNALS", "").split(",") if item]
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data
        for name, at in self.signals:
            if int(at) == self.calls:
                os.kill(os.getpid(), getattr(signal, "SIG" + name))
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''

NET = """name: tiny
layer:
  - {name: data, type: DummyData, top: [x, t],
     dummy_data_param: {shape: [{dim: [8, 16]}, {dim: [8, 4]}], data_filler: [{type: gaussian}]}}
  - {name: ip1, type: InnerProduct, bottom: x, top: h,
     inner_product_param: {num_output: 16, weight_filler: {type: gaussian, std: 0.2}}}
  - {name: relu, type: ReLU, bottom: h, top: h}
  - {name: pace, type: Python, bottom: h, top: h2, python_param: {module: signal_layers, layer: Pace}}
  - {name: ip2, type: InnerProduct, bottom: h2, top: y,
     inner_product_param: {num_output: 4, weight_filler: {type: gaussian, std: 0.2}}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""

SOLVER = """net: net.yaml
base_lr: 0.01
momentum: 0.9
weight_decay: 0.001
lr_policy: step
gamma: 0.5
stepsize: 50
max_iter: {max_iter}
display: 10
snapshot: {snapshot}
snapshot_prefix: run/tiny
random_seed: 7
solver_mode: CPU
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAFFELITE_TEST_SLEEP", raising=False)
    monkeypatch.delenv("CAFFELITE_TEST_SELF_SIGNALS", raising=False)
    (tmp_path / "signal_layers.py").write_text(LAYERS)
    (tmp_path / "net.yaml").write_text(NET)
    return tmp_path


def write_solver(folder, max_iter=40, snapshot=0, name="solver.yaml"):
    (folder / name).write_text(SOLVER.format(max_iter=max_iter, snapshot=snapshot))
    return name


def weights_of(path):
    return {(layer.name, j): blob_proto_to_array(b)
            for layer in load_weights(str(path)).layer for j, b in enumerate(layer.blobs)}


def train(*argv):
    return main(["train", *map(str, argv)])


# ---- a real subprocess, real signals from outside ----------------------------------------------
class Lines:
    """The stderr lines of a process, read by a thread, waited for with a timeout."""

    def __init__(self, stream):
        self.queue: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; got:\n" + "".join(self.seen[-30:]))

    def rest(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
        return "".join(self.seen)


def test_sigint_snapshot_then_sigterm_resumes_bit_for_bit(workdir):
    max_iter = 600
    solver = write_solver(workdir, max_iter=max_iter)
    env = dict(os.environ, CAFFELITE_TEST_SLEEP="0.005",
               PYTHONPATH=os.pathsep.join([str(REPO), str(workdir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "caffelite", "train", "--solver", solver,
                             "--sigint_effect", "snapshot"], cwd=workdir, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        lines = Lines(proc.stderr)
        lines.wait_for(r"\] Iteration 10 \(")
        proc.send_signal(signal.SIGINT)
        first = int(lines.wait_for(r"Snapshotting solver state .*_iter_(\d+)").rsplit("_iter_")[1].split(".")[0])
        lines.wait_for(r"\] Iteration \d+ \(")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log = lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143, log[-3000:]
    assert "SIGINT: snapshot requested" in log and "SIGTERM: snapshot then stop requested" in log
    assert "Optimization stopped early." in log
    sets = list_snapshots("run/tiny")
    iters = [s.iter for s in sets]
    assert len(iters) == 2 and iters[1] == first and first < iters[0] < max_iter, iters
    assert all(check_complete(s) is None for s in sets)
    assert latest_snapshot("run/tiny") == sets[0].state

    # The same run without interruption, then the interrupted one resumed with --snapshot auto.
    assert train("--solver", solver, "--set", "snapshot_prefix=ref/tiny", "--run_dir", "none") == 0
    assert train("--solver", solver, "--snapshot", "auto", "--run_dir", "none") == 0
    reference = weights_of(f"ref/tiny_iter_{max_iter}.caffemodel")
    resumed = weights_of(f"run/tiny_iter_{max_iter}.caffemodel")
    assert reference.keys() == resumed.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=str(key))


# ---- in-process: signals sent by a layer, at known iterations ----------------------------------
def test_sigint_stop_is_caffes_stop(workdir, monkeypatch, capsys):
    """Caffe's stop ends training early; Solve() still writes the final snapshot when
    snapshot_after_train is true (the default), and not otherwise."""
    solver = write_solver(workdir, max_iter=40)
    monkeypatch.setenv("CAFFELITE_TEST_SELF_SIGNALS", "INT@15")
    assert train("--solver", solver, "--run_dir", "none") == 0
    err = capsys.readouterr().err
    assert "Optimization stopped early." in err
    assert [s.iter for s in list_snapshots("run/tiny")] == [16]
    assert train("--solver", solver, "--run_dir", "none", "--set", "snapshot_after_train=false",
                 "--set", "snapshot_prefix=other/tiny") == 0
    assert list_snapshots("other/tiny") == []


def test_second_ctrl_c_stops_at_once(workdir, monkeypatch, capsys):
    solver = write_solver(workdir, max_iter=40)
    monkeypatch.setenv("CAFFELITE_TEST_SELF_SIGNALS", "INT@15,INT@15")
    assert train("--solver", solver, "--run_dir", "none") == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "caffelite train: interrupted"
    assert list_snapshots("run/tiny") == []  # stopped before the end of the iteration
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_sighup_snapshots_and_goes_on(workdir, monkeypatch):
    solver = write_solver(workdir, max_iter=30)
    monkeypatch.setenv("CAFFELITE_TEST_SELF_SIGNALS", "HUP@12,INT@20")
    assert train("--solver", solver, "--run_dir", "none", "--sigint_effect", "none") == 0
    assert [s.iter for s in list_snapshots("run/tiny")] == [30, 13]


def test_second_ctrl_c_waits_for_the_snapshot_being_written(tmp_path):
    from caffelite.io.atomic import critical, interrupt, write_bytes

    target = tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        with critical():
            write_bytes(target, b"old")
            interrupt()  # deferred: the section goes on
            write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(KeyboardInterrupt):
        interrupt()  # outside a section: at once


# ---- --snapshot auto and snapshot_keep ------------------------------------------------------------
def test_snapshot_auto_picks_the_newest_complete_set(workdir, capsys):
    solver = write_solver(workdir, max_iter=30, snapshot=10)
    assert train("--solver", solver, "--run_dir", "none", "--snapshot", "auto") == 0
    assert "--snapshot auto: no complete snapshot run/tiny_iter_* found; starting from scratch" in \
        capsys.readouterr().err
    run = workdir / "run"
    assert sorted(s.iter for s in list_snapshots("run/tiny")) == [10, 20, 30]
    (run / "tiny_iter_30.solverstate").unlink()  # incomplete: a kill before the state was written
    (run / "tiny_iter_40.solverstate").write_bytes(b"\x08")  # garbage
    (run / ".tiny_iter_50.solverstate.a1b2.tmp").write_bytes(b"partial")  # a temporary file
    assert latest_snapshot("run/tiny") == str(Path("run") / "tiny_iter_20.solverstate")
    write_solver(workdir, max_iter=25, snapshot=0)
    assert train("--solver", solver, "--run_dir", "none", "--snapshot", "auto") == 0
    err = capsys.readouterr().err
    assert re.search(r"resuming from run/tiny_iter_20\.solverstate", err), err[-2000:]
    assert "skipping the snapshot of iteration 40" in err and "skipping the snapshot of iteration 30" in err
    assert "Restoring previous solver status from run/tiny_iter_20.solverstate" in err
    assert (run / "tiny_iter_25.caffemodel").is_file()


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_keep_deletes_older_sets(workdir, fmt):
    solver = write_solver(workdir, max_iter=30, snapshot=5)
    (workdir / "run").mkdir()
    other = workdir / "run" / "tiny_iter_99.caffemodel"  # a later iteration: another run's, kept
    other.write_bytes(b"")
    assert train("--solver", solver, "--run_dir", "none", "--set", "snapshot_keep=2",
                 "--set", f"snapshot_format={fmt}") == 0
    names = sorted(p.name for p in (workdir / "run").iterdir())
    h5 = ".h5" if fmt == "HDF5" else ""
    assert names == sorted([f"tiny_iter_25.caffemodel{h5}", f"tiny_iter_25.solverstate{h5}",
                            f"tiny_iter_25.solverstate{h5}.json", f"tiny_iter_30.caffemodel{h5}",
                            f"tiny_iter_30.solverstate{h5}", f"tiny_iter_30.solverstate{h5}.json",
                            "tiny_iter_99.caffemodel"])


def test_snapshot_auto_with_weights_starts_from_them_when_there_is_no_snapshot(workdir, capsys):
    solver = write_solver(workdir, max_iter=10)
    assert train("--solver", solver, "--run_dir", "none", "--set", "snapshot_prefix=first/tiny") == 0
    capsys.readouterr()
    assert train("--solver", solver, "--run_dir", "none", "--snapshot", "auto",
                 "--weights", "first/tiny_iter_10.caffemodel") == 0
    err = capsys.readouterr().err
    assert "no complete snapshot run/tiny_iter_* found; starting from --weights" in err
    assert "Restoring previous solver status" not in err
    # Now there is one: it wins over --weights.
    assert train("--solver", solver, "--run_dir", "none", "--snapshot", "auto", "--set", "max_iter=15",
                 "--weights", "first/tiny_iter_10.caffemodel") == 0
    assert "resuming from run/tiny_iter_10.solverstate" in capsys.readouterr().err
    assert (workdir / "run" / "tiny_iter_15.caffemodel").is_file()
