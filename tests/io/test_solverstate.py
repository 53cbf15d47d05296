"""Solver states: real Caffe files, binary and HDF5 round trips, the sidecar, wrong files."""
import h5py
import numpy as np
import pytest

from conftest import FIXTURES
from caffelite.errors import ConfigError, DataError
from caffelite.io.solverstate import (SolverStateData, extra_path, read_extra, read_solverstate,
                                      write_extra, write_solverstate)
from caffelite.io.weights import load_weights
from caffelite.io.blob_proto import blob_proto_to_array

NET = FIXTURES / "net"


def weight_shapes(path) -> list[tuple]:
    """Shapes of the learnable blobs of a weights file, in net order."""
    return [blob_proto_to_array(b).shape for l in load_weights(str(path)).layer for b in l.blobs]


def test_caffe_adam_state():
    state = read_solverstate(str(NET / "fixture_iter_20.solverstate"))
    assert state.iter == 20 and state.current_step == 0
    assert state.learned_net == "fixture_iter_20.caffemodel"
    shapes = weight_shapes(NET / state.learned_net)
    assert len(state.history) == 2 * len(shapes) == 36  # Adam: m for every blob, then v for every blob
    assert [h.shape for h in state.history] == shapes + shapes
    assert all(h.dtype == np.float32 for h in state.history)
    n = len(shapes)
    assert all(np.all(v >= 0) for v in state.history[n:])  # second moments


def test_caffe_hdf5_state():
    state = read_solverstate(str(NET / "fixture_h5_iter_12.solverstate.h5"))
    assert state.iter == 12 and state.current_step == 2  # step policy, stepsize 5
    assert state.learned_net == "fixture_h5_iter_12.caffemodel.h5"
    assert (NET / state.learned_net).exists()
    # HDF5 lists layers by name, so take the net order from the binary snapshot of the same net.
    shapes = weight_shapes(NET / "fixture_iter_20.caffemodel")
    assert [h.shape for h in state.history] == shapes  # Nesterov: one history blob per parameter


def test_caffe_lenet_state():
    state = read_solverstate(str(FIXTURES / "lenet" / "lenet_iter_10000.solverstate"))
    assert state.iter == 10000
    assert state.learned_net == "lenet_iter_10000.caffemodel"
    assert [h.shape for h in state.history] == weight_shapes(FIXTURES / "lenet" / state.learned_net)


@pytest.mark.parametrize("ext", [".solverstate", ".solverstate.h5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip(tmp_path, ext, dtype):
    rng = np.random.default_rng(0)
    history = [rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=(5,)).astype(dtype)]
    path = tmp_path / f"s_iter_7{ext}"
    write_solverstate(str(path), SolverStateData(iter=7, learned_net="s_iter_7.caffemodel",
                                                 history=history, current_step=3))
    state = read_solverstate(str(path))
    assert (state.iter, state.learned_net, state.current_step) == (7, "s_iter_7.caffemodel", 3)
    for got, want in zip(state.history, history):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)


def test_hdf5_layout_matches_caffe(tmp_path):
    path = tmp_path / "s.solverstate.h5"
    write_solverstate(str(path), SolverStateData(iter=12, learned_net="fixture_h5_iter_12.caffemodel.h5",
                                                 history=[np.zeros(2, np.float32)], current_step=2))
    with h5py.File(path, "r") as mine, h5py.File(NET / "fixture_h5_iter_12.solverstate.h5", "r") as caffe:
        assert sorted(mine) == sorted(caffe)
        for name in ("iter", "current_step", "learned_net"):
            assert mine[name].shape == caffe[name].shape
            assert mine[name].dtype == caffe[name].dtype
            assert mine[name][()].tobytes() == caffe[name][()].tobytes()
        assert mine["learned_net"].id.get_type().get_strpad() == caffe["learned_net"].id.get_type().get_strpad()


@pytest.mark.parametrize("name", ["fixture_iter_20.caffemodel", "fixture_h5_iter_12.caffemodel.h5"])
def test_weights_file_is_refused(name):
    with pytest.raises(ConfigError, match="is a weights file, not a solver state; use --weights to start "
                                          "from it, or pass the .solverstate to --snapshot"):
        read_solverstate(str(NET / name))


def test_renamed_weights_files_are_recognised(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes((NET / "fixture_iter_20.caffemodel").read_bytes())
    hdf5 = tmp_path / "model.hdf5"
    hdf5.write_bytes((NET / "fixture_h5_iter_12.caffemodel.h5").read_bytes())
    for path in (binary, hdf5):
        with pytest.raises(ConfigError, match="is a weights file"):
            read_solverstate(str(path))


def test_missing_and_garbage(tmp_path):
    write_solverstate(str(tmp_path / "run_iter_5.solverstate"), SolverStateData(iter=5))
    with pytest.raises(ConfigError, match="run_iter_5.solverstate"):  # the hint lists what is there
        read_solverstate(str(tmp_path / "run_iter_50.solverstate"))
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="not a Caffe solver state"):
        read_solverstate(str(bad))


def test_sidecar(tmp_path):
    state = tmp_path / "s.solverstate"
    assert read_extra(str(state)) is None
    write_extra(str(state), {"iter": 3, "train_net": {"data": {"cursor": np.int64(4)}},
                             "rng": {"state": {"state": 2 ** 100}}, "w": np.arange(2)})
    assert extra_path(str(state)) == str(state) + ".json"
    extra = read_extra(str(state))
    assert extra["iter"] == 3 and extra["train_net"] == {"data": {"cursor": 4}}
    assert extra["rng"]["state"]["state"] == 2 ** 100 and extra["w"] == [0, 1]
    (tmp_path / "s.solverstate.json").write_text("{not json")
    with pytest.raises(DataError, match="sidecar"):
        read_extra(str(state))
    with pytest.raises(TypeError):
        write_extra(str(state), {"bad": object()})
