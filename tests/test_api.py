"""The pycaffe-style API: caffelite.Net, caffelite.get_solver and the lazy package exports."""
import subprocess
import sys

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

import caffelite
from caffelite import config
from caffelite.errors import ConfigError
from caffelite.net import Net as CoreNet
from caffelite.proto import pb
from conftest import FIXTURES, REPO

NET_DIR = FIXTURES / "net"
WEIGHTS = NET_DIR / "fixture_iter_20.caffemodel"


def deploy_text(batch=4) -> str:
    """The fixture net with an Input layer instead of HDF5Data and no loss/accuracy."""
    text = (NET_DIR / "net.prototxt").read_text()
    head, rest = text.split("\n", 1)
    _, rest = rest.split("batch_size: 4 } }\n", 1)
    lines = [line for line in rest.splitlines() if '"loss"' not in line and '"acc"' not in line]
    data = (f'layer {{ name: "input" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: 3 dim: 16 dim: 16 }} }} }}')
    return "\n".join([head, data, *lines]) + "\n"


@pytest.fixture(scope="module")
def deploy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "deploy.prototxt"
    path.write_text(deploy_text())
    return path


def inputs(n=4):
    with h5py.File(NET_DIR / "input.h5", "r") as h5:
        return h5["data"][:n].astype(np.float32)


def core_prob(x):
    net = CoreNet(config.parse_net(deploy_text(len(x)), "prototxt"))
    net.copy_trained_layers_from(str(WEIGHTS))
    net.blobs["data"].set_data(x)
    net.forward()
    return net.blobs["prob"].cpu_data().copy()


def test_net_forward_matches_the_core(deploy_path):
    net = caffelite.Net(str(deploy_path), str(WEIGHTS), caffelite.TEST)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    x = inputs()
    out = net.forward(data=x)
    assert list(out) == ["prob"]
    np.testing.assert_allclose(out["prob"], core_prob(x), rtol=1e-6)
    out["prob"][...] = 0  # a copy
    assert net.blobs["prob"].data.sum() > 0


def test_pycaffe_constructor_forms(deploy_path):
    a = caffelite.Net(str(deploy_path), caffelite.TEST)
    b = caffelite.Net(deploy_path, weights=str(WEIGHTS), phase="TEST")
    c = caffelite.Net(config.parse_net(deploy_text(), "prototxt"), str(WEIGHTS), "test")
    assert a.phase == b.phase == c.phase == caffelite.TEST
    np.testing.assert_array_equal(b.params["conv_a"][0].data, c.params["conv_a"][0].data)
    assert not np.array_equal(a.params["conv_a"][0].data, b.params["conv_a"][0].data)
    with pytest.raises(ConfigError, match="unknown phase"):
        caffelite.Net(deploy_path, phase="VALIDATE")


def test_blobs_and_params(deploy_path):
    net = caffelite.Net(deploy_path, WEIGHTS)
    assert list(net.blobs)[:3] == ["data", "conv_a", "bn_a"]
    conv = net.params["conv_a"]
    assert [p.shape for p in conv] == [(8, 3, 3, 3), (8,)]
    assert set(net.params) == {"conv_a", "bn_a", "scale_a", "conv_g", "prelu_g", "deconv", "ip_a",
                               "ip_t", "ip_g"}
    data = net.blobs["data"]
    assert (data.num, data.channels, data.height, data.width) == (4, 3, 16, 16)
    assert data.count == 4 * 3 * 16 * 16
    # .data is a writable view: writes reach the net.
    conv[1].data[...] = 0
    assert np.all(net.core.params["conv_a"][1].cpu_data() == 0)
    net.blobs["data"].data = inputs()
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, inputs())
    assert net.layer_names[0] == "input" and net.top_names["slice"] == ["slice_a", "slice_b"]
    assert net.bottom_names["concat"] == ["lrn_x", "lrn_w"]
    assert net.layer_dict["conv_a"].type == "Convolution"
    assert "inputs ['data']" in repr(net)


def test_forward_reshapes_for_a_new_batch(deploy_path):
    net = caffelite.Net(deploy_path, WEIGHTS)
    x = inputs(8)
    out = net.forward(data=x[:2])
    assert out["prob"].shape == (2, 5) and net.blobs["conv_a"].shape == (2, 8, 16, 16)
    np.testing.assert_allclose(out["prob"], core_prob(x[:2]), rtol=1e-6)
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], core_prob(x), rtol=1e-6)


def test_forward_extra_blobs_start_end(deploy_path):
    net = caffelite.Net(deploy_path, WEIGHTS)
    out = net.forward(blobs=["conv_a", "ip_g"], data=inputs())
    assert set(out) == {"prob", "conv_a", "ip_g"}
    part = net.forward(end="conv_g")
    assert list(part) == ["conv_g"]
    with pytest.raises(ConfigError, match="no layer named 'conv_q'"):
        net.forward(end="conv_q")
    with pytest.raises(ConfigError, match="'conv_a' is not an input"):
        net.forward(conv_a=np.zeros((4, 8, 16, 16)))


LINEAR = """
name: "linear"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def test_backward_gives_input_diffs():
    param = text_format.Parse(LINEAR, pb.NetParameter())
    with pytest.raises(ConfigError, match="force_backward"):
        caffelite.Net(param).backward(y=np.ones((2, 4)))
    net = caffelite.Net(param, force_backward=True)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    out = net.forward(x=x)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(out["y"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    diffs = net.backward(y=dy)
    assert list(diffs) == ["x"]
    np.testing.assert_allclose(diffs["x"], dy @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][0].diff, dy.T @ x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="not an output"):
        net.backward(x=dy)


def test_backward_of_a_loss_net_without_diffs():
    text = LINEAR + ('layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 4 } } }\n'
                     'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }\n')
    net = caffelite.Net(text_format.Parse(text, pb.NetParameter()), force_backward=True)
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    out = net.forward(x=x, t=t)
    y = net.blobs["y"].data
    np.testing.assert_allclose(out["loss"], ((y - t) ** 2).sum() / 4, rtol=1e-5)
    assert net.loss == pytest.approx(float(out["loss"]), rel=1e-6)
    diffs = net.backward(diffs=["y"])
    np.testing.assert_allclose(diffs["y"], (y - t) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["x"], diffs["y"] @ net.params["ip"][0].data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ext", [".caffemodel", ".caffemodel.h5"])
def test_save_and_copy_from(deploy_path, tmp_path, ext):
    net = caffelite.Net(deploy_path, WEIGHTS)
    net.params["ip_g"][0].data[...] = 0.5
    path = tmp_path / f"w{ext}"
    assert net.save(path) == str(path)
    other = caffelite.Net(deploy_path)
    other.copy_from(str(path))
    for name, blobs in net.params.items():
        for a, b in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_get_solver(tmp_path):
    overrides = ["max_iter=3", "test_interval=0", "display=0", "snapshot=0",
                 f"snapshot_prefix={tmp_path}/lenet", "snapshot_after_train=false", "test_iter=1"]
    solver = caffelite.get_solver(FIXTURES / "lenet" / "lenet_solver.prototxt", overrides)
    assert solver.iter == 0 and solver.type == "SGD"
    before = solver.net.params["conv1"][0].data.copy()
    solver.step(2)
    assert solver.iter == 2
    assert not np.array_equal(before, solver.net.params["conv1"][0].data)
    assert solver.net.blobs["data"].shape == (64, 1, 28, 28)
    assert np.isfinite(solver.net.blobs["loss"].data).all()
    assert len(solver.test_nets) == 1
    out = solver.test_nets[0].forward()
    assert set(out) == {"accuracy", "loss"}
    # Test nets share the trained weights.
    np.testing.assert_array_equal(solver.test_nets[0].params["conv1"][0].data,
                                  solver.net.params["conv1"][0].data)
    solver.solve()
    assert solver.iter == 3


def test_get_solver_from_a_message_with_weights(tmp_path):
    param = config.load_solver(FIXTURES / "lenet" / "lenet_solver.prototxt")
    solver = caffelite.get_solver(param, ["max_iter=1", "test_interval=0", "snapshot=0",
                                          "snapshot_after_train=false", "display=0"],
                                  weights=str(FIXTURES / "lenet" / "lenet_iter_10000.caffemodel"))
    weights = pb.NetParameter.FromString((FIXTURES / "lenet" / "lenet_iter_10000.caffemodel").read_bytes())
    conv1 = next(lp for lp in weights.layer if lp.name == "conv1")
    np.testing.assert_allclose(solver.net.params["conv1"][1].data, np.asarray(conv1.blobs[1].data))


def test_import_is_lazy():
    code = ("import sys, caffelite; "
            "assert 'numpy' not in sys.modules, 'numpy'; "
            "assert not [m for m in sys.modules if m.startswith('caffelite.')], sorted(sys.modules); "
            "assert caffelite.TEST == 1 and caffelite.TRAIN == 0; "
            "caffelite.NetSpec; caffelite.Net; caffelite.get_solver; caffelite.L; caffelite.P")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("given, expected", [(None, "20"), ("26", "26")])
def test_import_sets_openblas_thread_timeout_unless_given(monkeypatch, given, expected):
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    if given is not None:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", given)
    code = "import os, caffelite; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_package_exports():
    assert caffelite.Net is caffelite.api.Net
    assert caffelite.P.Pooling.MAX == pb.PoolingParameter.MAX
    assert "get_solver" in dir(caffelite)
    with pytest.raises(AttributeError):
        caffelite.no_such_thing  # noqa: B018
