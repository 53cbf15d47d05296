"""caffelite reproduces the numbers a real Caffe build wrote (shared/fixtures/caffe/net)."""
import re

import lmdb
import numpy as np
import pytest

from caffelite import config
from caffelite.io.weights import load_weights
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES

NET_DIR = FIXTURES / "net"


def read_features(name: str) -> list[np.ndarray]:
    """The float_data of every record of features/<name>, in key order."""
    env = lmdb.open(str(NET_DIR / "features" / name), readonly=True, lock=False)
    with env.begin() as txn:
        records = []
        for _, value in txn.cursor():
            datum = pb.Datum()
            datum.ParseFromString(value)
            records.append(np.array(datum.float_data, dtype=np.float64))
    env.close()
    return records


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


@pytest.fixture(scope="module")
def test_outputs():
    """Every blob of two TEST batches of net.prototxt with fixture_iter_20 weights."""
    path = NET_DIR / "net.prototxt"
    net = Net(config.load_net(path), phase=TEST, source=str(path))
    net.copy_trained_layers_from(str(NET_DIR / "fixture_iter_20.caffemodel"))
    batches = []
    for _ in range(2):
        net.forward()
        batches.append({name: blob.cpu_data().copy() for name, blob in net.blobs.items()})
    net.close()
    return batches


FEATURES = sorted(p.name for p in (NET_DIR / "features").iterdir()) if NET_DIR.is_dir() else []


@pytest.mark.parametrize("blob", FEATURES)
def test_forward_matches_caffe(test_outputs, blob):
    want = read_features(blob)
    got = []
    for batch in test_outputs:
        array = batch[blob]
        got.extend(array.reshape(array.shape[0] if array.ndim else 1, -1).astype(np.float64))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) <= 1e-4, blob


def test_train_gradients_match_caffe():
    """One TRAIN forward/backward reproduces Caffe's iteration-0 loss and gradients.

    The gradient run (solver_grad.prototxt: SGD, lr 1, no momentum, no decay)
    started from random fillers, not from fixture_iter_20 (its log copies no
    weights), so its starting weights are data + diff of the snapshot it wrote.
    BatchNorm uses batch statistics in TRAIN, so its stored blobs do not matter.
    """
    path = NET_DIR / "net_nodrop.prototxt"
    net = Net(config.load_net(path), phase=TRAIN, source=str(path))
    caffe = load_weights(str(NET_DIR / "fixture_grad_iter_1.caffemodel"))
    for layer in caffe.layer:
        for j, proto in enumerate(layer.blobs):
            start = blob_proto_to_array(proto) + blob_proto_to_array(proto, diff=True)
            net.params[layer.name][j].set_data(start.reshape(net.params[layer.name][j].shape))
    net.clear_param_diffs()
    loss = net.forward_backward()
    log = (NET_DIR / "train_grad.log").read_text()
    caffe_loss = float(re.search(r"Iteration 0, loss = ([\d.e+-]+)", log).group(1))
    assert loss == pytest.approx(caffe_loss, rel=1e-4)

    checked = 0
    for layer in caffe.layer:
        if not layer.blobs or layer.type == "BatchNorm":
            continue
        for j, proto in enumerate(layer.blobs):
            want = blob_proto_to_array(proto, diff=True).astype(np.float64)
            got = net.params[layer.name][j].cpu_diff().astype(np.float64).reshape(want.shape)
            if layer.name in ("conv_a", "deconv") and j == 1:
                # BatchNorm / MVN remove the mean after these biases: their
                # gradients are ~1e-8 and only the absolute error means anything.
                assert np.max(np.abs(got - want)) < 1e-6
            else:
                assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want)), (layer.name, j)
            checked += 1
    assert checked == 15
