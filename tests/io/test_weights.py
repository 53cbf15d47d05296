"""Weights files: binary and HDF5 round trips, real Caffe files, shared blobs, atomic writes."""
import os

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from conftest import FIXTURES
from caffelite.errors import ConfigError, DataError
from caffelite.io import atomic
from caffelite.io.weights import copy_weights, load_weights, read_h5_params, save_weights
from caffelite.net import Net
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb

NET = """
name: "w"
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        param { name: "shared_w" } param { }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        param { name: "shared_w" } param { }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip3" type: "InnerProduct" bottom: "y" top: "z"
        inner_product_param { num_output: 2 bias_term: false weight_filler { type: "gaussian" } } }
"""


def make_net(seed: int, dtype=np.float32) -> Net:
    return Net(text_format.Parse(NET, pb.NetParameter()), dtype=dtype, seed=seed)


def arrays(net: Net) -> dict:
    return {name: [b.cpu_data().copy() for b in blobs] for name, blobs in net.params.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ext", [".caffemodel", ".caffemodel.h5"])
def test_round_trip(tmp_path, ext, dtype):
    source, target = make_net(1, dtype), make_net(2, dtype)
    path = tmp_path / f"w{ext}"
    save_weights(source, str(path))
    assert not np.array_equal(source.params["ip3"][0].cpu_data(), target.params["ip3"][0].cpu_data())
    copy_weights(target, str(path))
    assert_same(arrays(source), arrays(target))
    # Shared blobs stay shared after loading.
    assert target.params["ip2"][0].cpu_data() is not None
    target.params["ip1"][0].data[...] = 7
    assert np.all(target.params["ip2"][0].cpu_data() == 7)


def test_caffemodel_reparses_with_the_schema(tmp_path):
    net = make_net(1)
    path = tmp_path / "w.caffemodel"
    save_weights(net, str(path), write_diff=True)
    param = pb.NetParameter()
    param.ParseFromString(path.read_bytes())
    assert [l.name for l in param.layer] == ["data", "ip1", "ip2", "ip3"]
    assert [len(l.blobs) for l in param.layer] == [0, 2, 2, 1]
    assert list(param.layer[1].blobs[0].shape.dim) == [3, 3]
    np.testing.assert_array_equal(blob_proto_to_array(param.layer[3].blobs[0]), net.params["ip3"][0].cpu_data())
    assert len(param.layer[3].blobs[0].diff) == 6


def test_hdf5_layout(tmp_path):
    net = make_net(1)
    path = tmp_path / "w.caffemodel.h5"
    save_weights(net, str(path), write_diff=True)
    with h5py.File(path, "r") as h5:
        assert sorted(h5["data"]) == ["data", "ip1", "ip2", "ip3"]
        assert sorted(h5["data/ip1"]) == ["0", "1"]
        assert sorted(h5["data/ip2"]) == ["1"]  # blob 0 is owned by ip1
        assert sorted(h5["diff/ip2"]) == ["0", "1"]  # diffs are written regardless of sharing
        assert h5["data/ip1/0"].dtype == np.float32 and h5["data/ip1/0"].shape == (3, 3)
    param = load_weights(str(path))
    assert [len(l.blobs) for l in param.layer] == [0, 2, 0, 1]


def test_hdf5_missing_owned_blob_is_an_error(tmp_path):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/ip3/1", data=np.zeros(2, np.float32))
    with pytest.raises(ConfigError, match="rename the layer"):
        copy_weights(make_net(1), str(path))


def test_shape_mismatch_hdf5(tmp_path):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/ip3/0", data=np.zeros((4, 3), np.float32))
    with pytest.raises(ConfigError, match="shape mismatch"):
        copy_weights(make_net(1), str(path))


def test_comma_separated_files(tmp_path):
    a, b, target = make_net(1), make_net(2), make_net(3)
    save_weights(a, str(tmp_path / "a.caffemodel"))
    with h5py.File(tmp_path / "b.h5", "w") as h5:
        h5.create_dataset("data/ip3/0", data=b.params["ip3"][0].cpu_data())
    copy_weights(target, f"{tmp_path / 'a.caffemodel'}, {tmp_path / 'b.h5'}")
    np.testing.assert_array_equal(target.params["ip1"][1].cpu_data(), a.params["ip1"][1].cpu_data())
    np.testing.assert_array_equal(target.params["ip3"][0].cpu_data(), b.params["ip3"][0].cpu_data())


def test_real_caffe_weights():
    param = load_weights(str(FIXTURES / "net" / "fixture_iter_20.caffemodel"))
    shapes = {l.name: [tuple(b.shape.dim) for b in l.blobs] for l in param.layer if l.blobs}
    assert shapes["conv_a"] == [(8, 3, 3, 3), (8,)]
    assert shapes["ip_a"] == [(16, 324), (16,)]
    h5 = load_weights(str(FIXTURES / "net" / "fixture_h5_iter_12.caffemodel.h5"))
    h5_shapes = {l.name: [tuple(b.shape.dim) for b in l.blobs] for l in h5.layer if l.blobs}
    assert h5_shapes == shapes
    assert "label_input_1_split" in [l.name for l in h5.layer]  # every layer has a group
    lenet = load_weights(str(FIXTURES / "lenet" / "lenet_iter_10000.caffemodel"))
    assert [l.name for l in lenet.layer if l.blobs] == ["conv1", "conv2", "ip1", "ip2"]


def test_v1_caffemodel_is_upgraded(tmp_path):
    old = pb.NetParameter(name="old")
    v1 = old.layers.add(name="ip3", type=pb.V1LayerParameter.INNER_PRODUCT)
    v1.bottom.append("y")
    v1.top.append("z")
    v1.inner_product_param.num_output = 2
    v1.blobs.add().CopyFrom(make_net(5).to_proto().layer[3].blobs[0])
    path = tmp_path / "old.caffemodel"
    path.write_bytes(old.SerializeToString())
    param = load_weights(str(path))
    assert [(l.name, l.type, len(l.blobs)) for l in param.layer] == [("ip3", "InnerProduct", 1)]
    net = make_net(1)
    copy_weights(net, str(path))
    np.testing.assert_array_equal(net.params["ip3"][0].cpu_data(), make_net(5).params["ip3"][0].cpu_data())


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_weights(str(tmp_path / "nope.caffemodel"))
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(DataError, match="binary Caffe model"):
        load_weights(str(bad))
    with pytest.raises(ConfigError, match="is a solver state, not a weights file"):
        load_weights(str(FIXTURES / "lenet" / "lenet_iter_10000.solverstate"))


# ---- atomic writes --------------------------------------------------------------------------
def test_atomic_write_keeps_old_file_when_the_body_raises(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(path) as f:
            f.write(b"new, partial")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("ext", [".caffemodel", ".caffemodel.h5"])
def test_failed_weights_write_keeps_old_file(tmp_path, monkeypatch, ext):
    path = tmp_path / f"w{ext}"
    save_weights(make_net(1), str(path))
    before = path.read_bytes()

    def fail(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        save_weights(make_net(2), str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.caffemodel"
    atomic.write_bytes(path, b"old")

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.caffemodel"]


def test_atomic_write_creates_folders_and_normal_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    atomic.write_text(path, "hi")
    assert path.read_text() == "hi"
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_read_h5_params_nested_names(tmp_path):
    path = tmp_path / "n.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/inception/1x1/0", data=np.ones(2, np.float32))
        h5.create_group("data/relu")
    params = read_h5_params(str(path))
    assert set(params) == {"inception/1x1", "relu"}
    assert params["relu"] == {}
