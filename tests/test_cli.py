"""The command line: Caffe's commands and flags, real-Caffe fixtures, one-line errors."""
import re
import shutil
import subprocess
import sys

import pytest

from caffelite.cli import main
from conftest import FIXTURES, gpu_ready

LENET = FIXTURES / "lenet"


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_test_command_reproduces_caffe_accuracy(capsys, monkeypatch):
    monkeypatch.chdir(LENET)
    code, _, err = run_cli(["test", "-model", "lenet_train_test.prototxt",
                            "-weights", "lenet_iter_10000.caffemodel", "-iterations", "20"], capsys)
    assert code == 0
    assert re.search(r"\] accuracy = 0\.987$", err, re.M), err[-2000:]
    assert re.search(r"\] loss = [\d.]+ \(\* 1 = [\d.]+ loss\)$", err, re.M)
    assert "Batch 19, accuracy" in err


def test_train_from_caffe_prototxt_solver(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(LENET)
    code, _, err = run_cli(["train", "--solver", "lenet_solver.prototxt", "--set", "max_iter=30",
                            "--set", "test_interval=30", "--set", "test_iter=2", "--set", "display=10",
                            "--set", f"snapshot_prefix={tmp_path}/lenet"], capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "lenet_iter_30.caffemodel").is_file()
    assert (tmp_path / "lenet_iter_30.solverstate").is_file()
    assert re.search(r"Iteration 10 \([\d.]+ iter/s, [\d.]+s/10 iters\), loss = [\d.]+", err)
    assert re.search(r"Iteration 30, Testing net \(#0\)", err)
    assert "Test net output #0: accuracy = " in err
    assert "Optimization Done." in err


def test_train_resume_and_weights(capsys, tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text((LENET / "lenet_solver.prototxt").read_text())
    (tmp_path / "lenet_train_test.prototxt").write_text(
        (LENET / "lenet_train_test.prototxt").read_text().replace("../mnist/", f"{FIXTURES}/mnist/"))
    common = ["--set", "test_interval=0", "--set", "display=0", "--set", "snapshot=10"]
    code, _, err = run_cli(["train", "--solver", solver, "--set", "max_iter=10", *common], capsys)
    assert code == 0, err
    state = tmp_path / "lenet_iter_10.solverstate"
    code, _, err = run_cli(["train", "--solver", solver, "--set", "max_iter=20", "--snapshot", state, *common], capsys)
    assert code == 0, err
    assert (tmp_path / "lenet_iter_20.caffemodel").is_file()
    code, _, err = run_cli(["train", "--solver", solver, "--set", "max_iter=5", *common,
                            "--weights", LENET / "lenet_iter_10000.caffemodel"], capsys)
    assert code == 0, err


def test_time_prints_per_layer_table(capsys, monkeypatch):
    monkeypatch.chdir(LENET)
    code, _, err = run_cli(["time", "-model", "lenet_train_test.prototxt", "-iterations", "2"], capsys)
    assert code == 0
    assert re.search(r"conv1\s+forward: [\d.]+ ms\.", err)
    assert re.search(r"conv1\s+backward: [\d.]+ ms\.", err)
    for line in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward"):
        assert line in err


@pytest.mark.skipif(gpu_ready(), reason="a GPU is here: device_query reports it (tests/test_gpu_support.py)")
def test_device_query_without_gpu(capsys):
    code, out, _ = run_cli(["device_query"], capsys)
    assert code == 0
    assert "GPU" in out
    assert "CPU kernels: compiled" in out


def test_a_closed_pipe_ends_quietly():
    """`caffelite device_query | head -1`: the reader leaves early; exit 141, no message."""
    proc = subprocess.Popen([sys.executable, "-m", "caffelite", "device_query"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # (the reader is gone before anything is written)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


GOOD = """name: t
layer:
  - {name: data, type: Input, top: [x], input_param: {shape: {dim: [2, 3]}}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 2}}
"""

BAD_NETS = {
    "unknown layer type": (GOOD.replace("type: InnerProduct", "type: InnerProdcut"),
                           r"net\.yaml:4: layer 'ip': unknown layer type 'InnerProdcut' \(did you mean 'InnerProduct'\?\)"),
    "unknown field": (GOOD.replace("num_output", "num_outptu"),
                      r"net\.yaml:4: layer 'ip': unknown key 'num_outptu' in InnerProductParameter \(did you mean 'num_output'\?\)"),
    "bad enum": (GOOD.replace("top: [x],", "top: [x], include: {phase: TRIAN},"),
                 r"net\.yaml:3: layer 'data': bad value 'TRIAN' for 'phase' \(did you mean 'TRAIN'\?\)"),
    "missing bottom": (GOOD.replace("bottom: x", "bottom: z"),
                       r"net\.yaml:4: layer 'ip': bottom 'z' is not produced"),
    "duplicate top": (GOOD + "  - {name: ip2, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 2}}\n",
                      r"net\.yaml:5: layer 'ip2': top 'y' is produced by more than one layer"),
    "shape mismatch": (GOOD + "  - {name: sum, type: Eltwise, bottom: [x, y], top: s}\n",
                       r"net\.yaml:5: layer 'sum': .*shape"),
    "malformed yaml": (GOOD.replace("{num_output: 2}}", "{num_output: 2}"),
                       r"net\.yaml:\d+: malformed YAML"),
    "missing lmdb": (GOOD.replace("type: Input, top: [x], input_param: {shape: {dim: [2, 3]}}",
                                  "type: Data, top: [x], data_param: {source: nowhere_lmdb, batch_size: 2, backend: LMDB}"),
                     r"nowhere_lmdb"),
}


@pytest.mark.parametrize("case", sorted(BAD_NETS))
def test_bad_input_is_one_line_without_traceback(case, capsys, tmp_path):
    text, pattern = BAD_NETS[case]
    net = tmp_path / "net.yaml"
    net.write_text(text)
    code, out, err = run_cli(["time", "--model", net, "--iterations", "1"], capsys)
    assert code in (2, 3)
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert re.search(pattern, message), message
    assert str(net) in message


def test_caffemodel_passed_to_snapshot(capsys, monkeypatch):
    monkeypatch.chdir(LENET)
    code, _, err = run_cli(["train", "--solver", "lenet_solver.prototxt",
                            "--snapshot", "lenet_iter_10000.caffemodel"], capsys)
    assert code == 2
    assert "is a weights file, not a solver state" in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    net = tmp_path / "net.yaml"
    net.write_text(GOOD.replace("type: InnerProduct", "type: Nope"))
    with pytest.raises(Exception, match="unknown layer type"):
        main(["time", "--model", str(net), "--debug"])


@pytest.mark.skipif(shutil.which("caffelite") is None, reason="console script not installed")
def test_console_script_and_module_entry_points(tmp_path):
    net = tmp_path / "net.yaml"
    net.write_text(GOOD.replace("num_output", "num_outptu"))
    for command in (["caffelite"], [sys.executable, "-m", "caffelite"]):
        result = subprocess.run([*command, "time", "-model", str(net)], capture_output=True, text=True)
        assert result.returncode == 2
        assert "did you mean 'num_output'" in result.stderr
        assert "Traceback" not in result.stderr
