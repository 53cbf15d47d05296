"""The bad-input catalogue: every mistake is one stderr line (file, line, layer, what to do) and
a documented exit code (2 configuration, 3 data, 4 training), never a traceback.

tests/test_cli.py covers unknown layer types, unknown fields, bad enums, missing bottoms,
duplicate tops, an Eltwise shape mismatch, malformed net YAML, a missing LMDB and a
.caffemodel passed to --snapshot; this file covers the rest.
"""
import os
import re
import shutil

import h5py
import numpy as np
import pytest

from caffelite.cli import main
from caffelite.data.datum import encode_datum
from caffelite.data.lmdb_source import write_lmdb

CONFIG, DATA = 2, 3

GOOD = """name: t
layer:
  - {name: data, type: Input, top: [x], input_param: {shape: {dim: [2, 3]}}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 2}}
"""
TRAINABLE = GOOD + "  - {name: loss, type: EuclideanLoss, bottom: [y, y], top: l}\n"
SOLVER = "net: net.yaml\nbase_lr: 0.01\nmax_iter: 2\nlr_policy: fixed\nsolver_mode: CPU\n" \
         "snapshot_prefix: snap/t\n"
LMDB_NET = """name: d
layer:
  - {name: data, type: Data, top: [x, label], data_param: {source: %s, batch_size: 2, backend: LMDB}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 3}}
  - {name: loss, type: SoftmaxWithLoss, bottom: [y, label], top: l}
"""
H5_NET = """name: h
layer:
  - {name: data, type: HDF5Data, top: [data, label], hdf5_data_param: {source: %s, batch_size: 2}}
  - {name: ip, type: InnerProduct, bottom: data, top: y, inner_product_param: {num_output: 3}}
  - {name: loss, type: SoftmaxWithLoss, bottom: [y, label], top: l}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Files shared by the cases: a trained snapshot, databases, HDF5 files."""
    root = tmp_path_factory.mktemp("bad_input")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        (root / "net.yaml").write_text(TRAINABLE)
        (root / "solver.yaml").write_text(SOLVER)
        assert main(["train", "--solver", "solver.yaml", "--run_dir", "none"]) == 0
        assert main(["train", "--solver", "solver.yaml", "--run_dir", "none", "--set", "snapshot_format=HDF5",
                     "--set", "snapshot_prefix=snaph5/t"]) == 0
        shutil.copy("snap/t_iter_2.caffemodel", "renamed.solverstate")
        (root / "garbage.caffemodel").write_bytes(b"\xff\xff\xff\x07garbage")
        (root / "garbage.solverstate").write_bytes(b"\xff\xff\xff\x07garbage")
        (root / "empty_dir").mkdir()
        (root / "a_file").write_text("x")
        image = np.zeros((1, 2, 2), np.uint8)
        write_lmdb("empty_lmdb", [])
        write_lmdb("corrupt_lmdb", [(b"00000000", b"\xff\xff garbage")])
        short = encode_datum(image, 1)[:-1]  # one pixel short, as a torn write would leave it
        write_lmdb("corrupt2_lmdb", [(b"00000000", encode_datum(image, 1)), (b"00000001", short)])
        write_lmdb("labels_lmdb", [(b"%08d" % i, encode_datum(image, 7)) for i in range(4)])
        with h5py.File("nolabel.h5", "w") as f:
            f["data"] = np.zeros((4, 3), np.float32)
        (root / "not_hdf5.h5").write_text("not hdf5")
        for name, listed in (("missing_list.txt", "missing.h5"), ("nolabel_list.txt", "nolabel.h5"),
                             ("bad_list.txt", "not_hdf5.h5")):
            (root / name).write_text(listed + "\n")
    finally:
        os.chdir(cwd)
    return root


def run(workspace, monkeypatch, capsys, argv, files=None):
    monkeypatch.chdir(workspace)
    for name, text in (files or {}).items():
        (workspace / name).write_text(text)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    return code, lines[-1]


def time_net(text, name="case.yaml"):
    return ["time", "--model", name, "--iterations", 1], {name: text}


def train_solver(text, *extra):
    return ["train", "--solver", "case_solver.yaml", "--run_dir", "none", *extra], {"case_solver.yaml": text}


FIVE = {"case.yaml": TRAINABLE.replace("num_output: 2", "num_output: 5")}  # ip's weights: (5, 3)


def with_five(argv, files=None):
    return argv, {**(files or {}), **FIVE}


CASES = {
    # -- configuration: values, fields, structure ---------------------------------------------
    "wrong int type": (time_net(GOOD.replace("num_output: 2", "num_output: two")), CONFIG,
                       r"case\.yaml:4: layer 'ip': 'num_output' takes an integer, got 'two'"),
    "wrong bool type": (time_net(GOOD.replace("num_output: 2", "num_output: 2, bias_term: maybe")), CONFIG,
                        r"case\.yaml:4: layer 'ip': 'bias_term' takes true or false, got 'maybe'"),
    "list for a single value": (time_net(GOOD.replace("num_output: 2", "num_output: [2, 3]")), CONFIG,
                                r"case\.yaml:4: layer 'ip': 'num_output' takes a single value"),
    "empty net file": (time_net(""), CONFIG, r"case\.yaml: the file is empty"),
    "net file is a list": (time_net("- a\n- b\n"), CONFIG,
                           r"case\.yaml:1: expected a mapping of NetParameter fields"),
    "malformed prototxt": (
        time_net('name: "t"\nlayer { name: "a" type: "Input" top: "x" input_param { shape { dim: 2 } } }\n'
                 'layer { name: "b" type: "InnerProduct" bottom: "x" top "y" }\n', "case.prototxt"),
        CONFIG, r"case\.prototxt:3: layer 'b': "),
    "unknown prototxt field": (
        time_net('name: "t"\nlayer { name: "a" type: "Input" top: "x" input_param { shape { dim: 2 } } }\n'
                 'layer { name: "b" type: "InnerProduct" bottom: "x" top: "y" '
                 'inner_product_param { num_outputs: 2 } }\n', "case.prototxt"),
        CONFIG, r"case\.prototxt:3: layer 'b': unknown field 'num_outputs' in InnerProductParameter "
                r"\(did you mean 'num_output'\?\)"),
    "cycle (a layer reading a later top)": (
        time_net(GOOD.replace("bottom: x", "bottom: z")
                 + "  - {name: ip2, type: InnerProduct, bottom: y, top: z, inner_product_param: {num_output: 3}}\n"),
        CONFIG, r"case\.yaml:4: layer 'ip': bottom 'z' is produced only by the later layer 'ip2' .*file order"),
    "concat shape mismatch": (
        time_net(GOOD + "  - {name: cat, type: Concat, bottom: [x, y], top: c, concat_param: {axis: 0}}\n"),
        CONFIG, r"case\.yaml:5: layer 'cat': \(Concat\) bottom 1 has shape \(2, 2\) but bottom 0 has \(2, 3\)"),
    "solver unknown field": (train_solver(SOLVER + "base_lrr: 1\n"), CONFIG,
                             r"case_solver\.yaml:7: unknown key 'base_lrr' in SolverParameter \(did you mean 'base_lr'\?\)"),
    "solver bad enum": (train_solver(SOLVER + "snapshot_format: HDF6\n"), CONFIG,
                        r"case_solver\.yaml:7: bad value 'HDF6' for 'snapshot_format' \(did you mean 'HDF5'\?\)"),
    "solver malformed yaml": (train_solver(SOLVER + "display: [1\n"), CONFIG,
                              r"case_solver\.yaml:\d+: malformed YAML"),
    "solver bad lr_policy": (train_solver(SOLVER.replace("fixed", "fixd")), CONFIG,
                             r"case_solver\.yaml: unknown lr_policy type 'fixd' \(did you mean 'fixed'\?\)"),
    "bad --set value": (train_solver(SOLVER, "--set", "max_iter=abc"), CONFIG,
                        r"'max_iter' takes an integer, got 'abc'"),
    "--weights with --snapshot": (train_solver(SOLVER, "--weights", "snap/t_iter_2.caffemodel",
                                               "--snapshot", "snap/t_iter_2.solverstate"), CONFIG,
                                  r"give either --weights or --snapshot, not both"),
    # -- missing files and folders ---------------------------------------------------------------
    "missing net file": (["time", "--model", "nope.yaml"], CONFIG, r"nope\.yaml: net file not found"),
    "net path is a folder": (["time", "--model", "empty_dir"], CONFIG,
                             r"empty_dir: is a folder, not a net file"),
    "missing solver file": (["train", "--solver", "nope_solver.yaml"], CONFIG,
                            r"nope_solver\.yaml: solver file not found"),
    "solver names a missing net": (train_solver(SOLVER.replace("net.yaml", "gone.yaml")), CONFIG,
                                   r"gone\.yaml: net file not found"),
    "missing weights file": (train_solver(SOLVER, "--weights", "nope.caffemodel"), DATA,
                             r"nope\.caffemodel: weights file not found"),
    "missing snapshot file": (train_solver(SOLVER, "--snapshot", "nope.solverstate"), CONFIG,
                              r"nope\.solverstate: solver state not found"),
    "LMDB folder without data.mdb": (time_net(LMDB_NET % "empty_dir"), DATA,
                                     r"case\.yaml:3: layer 'data': 'empty_dir' is not an LMDB"),
    "LMDB path is a file": (time_net(LMDB_NET % "a_file"), DATA,
                            r"case\.yaml:3: layer 'data': 'a_file' is not an LMDB"),
    "missing HDF5 list file": (time_net(H5_NET % "nolist.txt"), DATA,
                               r"case\.yaml:3: layer 'data': HDF5 list file 'nolist\.txt' does not exist"),
    "missing listed HDF5 file": (time_net(H5_NET % "missing_list.txt"), DATA,
                                 r"case\.yaml:3: layer 'data': HDF5 file 'missing\.h5' listed in "
                                 r"'missing_list\.txt' does not exist"),
    # -- malformed data ----------------------------------------------------------------------------
    "empty LMDB": (time_net(LMDB_NET % "empty_lmdb"), DATA,
                   r"case\.yaml:3: layer 'data': LMDB 'empty_lmdb' holds no records"),
    "corrupt LMDB record": (time_net(LMDB_NET % "corrupt_lmdb"), DATA,
                            r"case\.yaml:3: layer 'data': record '00000000' of 'corrupt_lmdb' is not a Datum"),
    "corrupt later LMDB record": (time_net(LMDB_NET % "corrupt2_lmdb"), DATA,
                                  r"case\.yaml:3: layer 'data': record '00000001' of 'corrupt2_lmdb' is not a Datum"),
    "HDF5 file without the dataset": (time_net(H5_NET % "nolabel_list.txt"), DATA,
                                      r"case\.yaml:3: layer 'data': HDF5 file '.*nolabel\.h5' has no dataset "
                                      r"'label' \(it holds: data\)"),
    "HDF5 file that is not HDF5": (time_net(H5_NET % "bad_list.txt"), DATA,
                                   r"case\.yaml:3: layer 'data': cannot open HDF5 file '.*not_hdf5\.h5'"),
    "labels out of range": (time_net(LMDB_NET % "labels_lmdb"), DATA,
                            r"case\.yaml:5: layer 'loss': \(SoftmaxWithLoss\) label 7 at position 0 is outside "
                            r"the 3 classes \[0, 3\)"),
    # -- weights and snapshots ----------------------------------------------------------------------
    "weights of the wrong shape (test)": (
        with_five(["test", "--model", "case.yaml", "--weights", "snap/t_iter_2.caffemodel", "--iterations", 1]),
        CONFIG, r"case\.yaml:4: layer 'ip': cannot copy param 0 weights: shape mismatch; the weights have "
                r"\(2, 3\), the net has \(5, 3\) \(weights file 'snap/t_iter_2\.caffemodel'\) \(.*rename the layer\)"),
    "weights of the wrong shape (train)": (
        with_five(*train_solver(SOLVER.replace("net.yaml", "case.yaml"), "--weights", "snap/t_iter_2.caffemodel")),
        CONFIG, r"case\.yaml:4: layer 'ip': cannot copy param 0 weights: shape mismatch.*snap/t_iter_2\.caffemodel"),
    "weights of the wrong shape (HDF5)": (
        with_five(["test", "--model", "case.yaml", "--weights", "snaph5/t_iter_2.caffemodel.h5", "--iterations", 1]),
        CONFIG, r"layer 'ip': cannot copy param 0 weights: shape mismatch"),
    "solver state given as --weights": (train_solver(SOLVER, "--weights", "snap/t_iter_2.solverstate"), CONFIG,
                                        r"t_iter_2\.solverstate is a solver state, not a weights file; use --snapshot"),
    "HDF5 solver state given as --weights": (
        ["test", "--model", "net.yaml", "--weights", "snaph5/t_iter_2.solverstate.h5", "--iterations", 1],
        CONFIG, r"t_iter_2\.solverstate\.h5 is a solver state, not a weights file"),
    "HDF5 weights given as --snapshot": (train_solver(SOLVER, "--snapshot", "snaph5/t_iter_2.caffemodel.h5"), CONFIG,
                                         r"t_iter_2\.caffemodel\.h5 is a weights file, not a solver state; use --weights"),
    "weights renamed to .solverstate": (train_solver(SOLVER, "--snapshot", "renamed.solverstate"), CONFIG,
                                        r"renamed\.solverstate is a weights file, not a solver state"),
    "garbage weights file": (train_solver(SOLVER, "--weights", "garbage.caffemodel"), DATA,
                             r"garbage\.caffemodel: cannot read the file as a binary Caffe model"),
    "garbage solver state": (train_solver(SOLVER, "--snapshot", "garbage.solverstate"), DATA,
                             r"garbage\.solverstate: not a Caffe solver state"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, workspace, monkeypatch, capsys):
    command, code, pattern = CASES[case]
    argv, files = command if isinstance(command, tuple) else (command, None)
    got, line = run(workspace, monkeypatch, capsys, argv, files)
    assert re.search(pattern, line), line
    assert got == code, line
    command = argv[0]
    assert line.startswith(f"caffelite {command}: error: ")
