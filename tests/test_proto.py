"""caffelite.proto must read and write exactly what BVLC Caffe does.

The golden files under shared/fixtures/caffe/ were written by a real Caffe
build; parsing them with no unknown fields and re-serialising them to the same
bytes shows that our field numbers, types and packing match caffe.proto.
"""

import math
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from google.protobuf import unknown_fields

from caffelite.proto import pb

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "caffe"

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"Caffe golden files not found at {FIXTURES}"
)


def _fixture_files(pattern):
    if not FIXTURES.is_dir():
        return []
    return sorted(FIXTURES.rglob(pattern))


def _ids(paths):
    return [str(p.relative_to(FIXTURES)) for p in paths]


def unknown_field_paths(msg, path="root"):
    """Every place in `msg` (recursively) that holds fields we do not know."""
    found = []
    ufs = unknown_fields.UnknownFieldSet(msg)
    if len(ufs):
        found.append((path, sorted({f.field_number for f in ufs})))
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            for i, item in enumerate(value):
                found += unknown_field_paths(item, f"{path}.{fd.name}[{i}]")
        else:
            found += unknown_field_paths(value, f"{path}.{fd.name}")
    return found


def parse_exact(cls, data):
    """Parse `data`, check nothing is unknown and that it re-serialises as-is."""
    msg = cls()
    msg.ParseFromString(data)
    assert unknown_field_paths(msg) == []
    assert msg.SerializeToString() == data
    return msg


# ---------------------------------------------------------------------------
# Golden files from real Caffe
# ---------------------------------------------------------------------------

PROTOTXTS = _fixture_files("*.prototxt")


@needs_fixtures
@pytest.mark.parametrize("path", PROTOTXTS, ids=_ids(PROTOTXTS))
def test_prototxt_parses(path):
    cls = pb.SolverParameter if "solver" in path.name else pb.NetParameter
    msg = text_format.Parse(path.read_text(), cls())
    if cls is pb.NetParameter:
        assert len(msg.layer) > 0
    else:
        assert msg.HasField("net") or msg.HasField("train_net")


@needs_fixtures
def test_prototxt_fixture_set_is_complete():
    names = {p.relative_to(FIXTURES).as_posix() for p in PROTOTXTS}
    assert {
        "lenet/lenet_train_test.prototxt",
        "lenet/lenet_solver.prototxt",
        "net/net.prototxt",
        "images/data_net.prototxt",
    } <= names


@needs_fixtures
@pytest.mark.parametrize(
    "relpath",
    [
        "lenet/lenet_iter_10000.caffemodel",
        "lenet/lenet_iter_5000.caffemodel",
        "net/fixture_iter_20.caffemodel",
        "net/fixture_grad_iter_1.caffemodel",
    ],
)
def test_caffemodel_roundtrip(relpath):
    net = parse_exact(pb.NetParameter, (FIXTURES / relpath).read_bytes())
    assert len(net.layer) > 0
    assert len(net.layers) == 0
    with_blobs = [layer for layer in net.layer if layer.blobs]
    assert with_blobs
    for layer in with_blobs:
        for blob in layer.blobs:
            dims = list(blob.shape.dim)
            assert dims, f"{layer.name}: blob without shape"
            assert len(blob.data) == math.prod(dims), layer.name


@needs_fixtures
def test_lenet_caffemodel_contents():
    net = parse_exact(
        pb.NetParameter, (FIXTURES / "lenet/lenet_iter_10000.caffemodel").read_bytes()
    )
    shapes = {
        layer.name: [list(b.shape.dim) for b in layer.blobs]
        for layer in net.layer
        if layer.blobs
    }
    assert shapes == {
        "conv1": [[20, 1, 5, 5], [20]],
        "conv2": [[50, 20, 5, 5], [50]],
        "ip1": [[500, 800], [500]],
        "ip2": [[10, 500], [10]],
    }
    conv1 = next(layer for layer in net.layer if layer.name == "conv1")
    assert conv1.type == "Convolution"
    assert conv1.convolution_param.num_output == 20
    assert list(conv1.convolution_param.kernel_size) == [5]
    assert conv1.phase == pb.TRAIN


@needs_fixtures
def test_fixture_net_layer_params_survive():
    net = parse_exact(
        pb.NetParameter, (FIXTURES / "net/fixture_iter_20.caffemodel").read_bytes()
    )
    types = {layer.type for layer in net.layer}
    assert {
        "Convolution", "BatchNorm", "Scale", "PReLU", "Pooling", "LRN", "Concat",
        "Slice", "Eltwise", "Deconvolution", "Crop", "MVN", "Flatten", "Reshape",
        "InnerProduct", "TanH", "Dropout", "Softmax", "SoftmaxWithLoss", "Accuracy",
    } <= types
    bn = next(layer for layer in net.layer if layer.type == "BatchNorm")
    assert [list(b.shape.dim) for b in bn.blobs][2] == [1]


@needs_fixtures
@pytest.mark.parametrize(
    "relpath, iteration, n_history",
    [
        ("lenet/lenet_iter_10000.solverstate", 10000, 8),
        ("lenet/lenet_iter_5000.solverstate", 5000, 8),
        ("net/fixture_iter_20.solverstate", 20, 36),
        ("net/fixture_grad_iter_1.solverstate", 1, 18),
    ],
)
def test_solverstate_roundtrip(relpath, iteration, n_history):
    path = FIXTURES / relpath
    state = parse_exact(pb.SolverState, path.read_bytes())
    assert state.iter == iteration
    assert state.learned_net == path.name.replace(".solverstate", ".caffemodel")
    assert len(state.history) == n_history
    for blob in state.history:
        assert len(blob.data) == math.prod(blob.shape.dim)


@needs_fixtures
def test_mnist_datum():
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(
        str(FIXTURES / "mnist" / "mnist_train_lmdb"), readonly=True, lock=False
    )
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            assert cursor.first()
            key, value = cursor.item()
            datum = parse_exact(pb.Datum, value)
            count = txn.stat()["entries"]
    finally:
        env.close()
    assert key.startswith(b"00000000_")
    assert (datum.channels, datum.height, datum.width) == (1, 28, 28)
    assert len(datum.data) == 784
    assert not datum.encoded
    assert 0 <= datum.label <= 9
    assert count == 8000


@needs_fixtures
@pytest.mark.parametrize(
    "relpath, encoded",
    [("images/lmdb_encoded", True), ("images/lmdb_raw_32", False),
     ("net/features/conv_a", False)],
)
def test_other_datum_dbs(relpath, encoded):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(FIXTURES / relpath), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            for _, value in txn.cursor():
                datum = parse_exact(pb.Datum, value)
                assert datum.encoded == encoded
    finally:
        env.close()


@needs_fixtures
def test_mean_binaryproto():
    blob = parse_exact(
        pb.BlobProto, (FIXTURES / "images" / "mean_32.binaryproto").read_bytes()
    )
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 32, 32)
    assert len(blob.data) == 3 * 32 * 32


LOGS = _fixture_files("*.log")


@needs_fixtures
def test_solver_params_printed_by_caffe_parse_in_field_order():
    """Caffe logs the SolverParameter in text format, fields in number order.

    Parsing it back must work, and our field numbers must sort the fields the
    same way Caffe did.
    """
    seen = 0
    for log in LOGS:
        lines = log.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.endswith("Initializing solver from parameters: "):
                continue
            block = []
            for nxt in lines[i + 1:]:
                if re.match(r"^[IWEF]\d{4}", nxt):
                    break
                block.append(nxt)
            solver = text_format.Parse("\n".join(block), pb.SolverParameter())
            printed = [
                m.group(1)
                for m in (re.match(r"^(\w+)[ :{]", b) for b in block)
                if m
            ]
            ours = [fd.name for fd, _ in solver.ListFields()]
            ours_order = sorted(ours, key=lambda n: printed.index(n))
            assert ours == ours_order, log
            seen += 1
    assert seen >= 3


# ---------------------------------------------------------------------------
# Schema facts
# ---------------------------------------------------------------------------

def _num(cls, field):
    return cls.DESCRIPTOR.fields_by_name[field].number


def test_key_field_numbers():
    assert {f: _num(pb.NetParameter, f) for f in (
        "name", "layers", "input", "input_dim", "force_backward", "state",
        "debug_info", "input_shape", "layer")} == {
        "name": 1, "layers": 2, "input": 3, "input_dim": 4, "force_backward": 5,
        "state": 6, "debug_info": 7, "input_shape": 8, "layer": 100}
    assert {f: _num(pb.Datum, f) for f in (
        "channels", "height", "width", "data", "label", "float_data", "encoded")} == {
        "channels": 1, "height": 2, "width": 3, "data": 4, "label": 5,
        "float_data": 6, "encoded": 7}
    assert _num(pb.LayerParameter, "transform_param") == 100
    assert _num(pb.LayerParameter, "convolution_param") == 106
    assert _num(pb.LayerParameter, "pooling_param") == 121
    assert _num(pb.LayerParameter, "batch_norm_param") == 139
    assert _num(pb.LayerParameter, "input_param") == 143
    assert _num(pb.LayerParameter, "swish_param") == 147
    assert _num(pb.LayerParameter, "clip_param") == 148
    assert _num(pb.SolverParameter, "net") == 24
    assert _num(pb.SolverParameter, "layer_wise_reduce") == 41
    assert _num(pb.SolverParameter, "weights") == 42
    assert _num(pb.V1LayerParameter, "param") == 1001
    assert _num(pb.V1LayerParameter, "layer") == 1


def test_layer_specific_params_fill_100_to_148():
    numbers = sorted(
        fd.number for fd in pb.LayerParameter.DESCRIPTOR.fields if fd.number >= 100
    )
    assert numbers == list(range(100, 149))


def test_packed_exactly_where_caffe_has_it():
    packed = {
        f"{msg.name}.{fd.name}"
        for msg in pb.DESCRIPTOR.message_types_by_name.values()
        for fd in msg.fields
        if fd.is_packed
    }
    assert packed == {
        "BlobShape.dim", "BlobProto.data", "BlobProto.diff",
        "BlobProto.double_data", "BlobProto.double_diff",
    }


def test_clip_param_bounds_are_required():
    fields = pb.ClipParameter.DESCRIPTOR.fields_by_name
    assert fields["min"].is_required and fields["max"].is_required


def test_defaults():
    conv = pb.ConvolutionParameter()
    assert conv.bias_term is True
    assert conv.group == 1
    assert conv.axis == 1
    assert conv.engine == pb.ConvolutionParameter.DEFAULT

    lrn = pb.LRNParameter()
    assert lrn.local_size == 5
    assert lrn.alpha == 1.0
    assert lrn.beta == pytest.approx(0.75)
    assert lrn.k == 1.0
    assert lrn.norm_region == pb.LRNParameter.ACROSS_CHANNELS

    pool = pb.PoolingParameter()
    assert pool.pool == pb.PoolingParameter.MAX
    assert pool.stride == 1
    assert pool.round_mode == pb.PoolingParameter.CEIL

    bn = pb.BatchNormParameter()
    assert bn.moving_average_fraction == pytest.approx(0.999)
    assert bn.eps == pytest.approx(1e-5)
    assert not bn.HasField("use_global_stats")

    solver = pb.SolverParameter()
    assert solver.momentum2 == pytest.approx(0.999)
    assert solver.delta == pytest.approx(1e-8)
    assert solver.rms_decay == pytest.approx(0.99)
    assert solver.test_initialization is True
    assert solver.snapshot_after_train is True
    assert solver.iter_size == 1
    assert solver.average_loss == 1
    assert solver.random_seed == -1
    assert solver.type == "SGD"
    assert solver.regularization_type == "L2"
    assert solver.clip_gradients == -1
    assert solver.solver_mode == pb.SolverParameter.GPU
    assert solver.snapshot_format == pb.SolverParameter.BINARYPROTO

    data = pb.DataParameter()
    assert data.prefetch == 4
    assert data.backend == pb.DataParameter.LEVELDB

    spec = pb.LayerParameter().param.add()
    assert spec.lr_mult == 1.0
    assert spec.decay_mult == 1.0

    assert pb.DropoutParameter().dropout_ratio == pytest.approx(0.5)
    assert pb.LossParameter().normalization == pb.LossParameter.VALID
    assert pb.AccuracyParameter().top_k == 1
    assert pb.NetState().phase == pb.TEST

    filler = pb.FillerParameter()
    assert filler.type == "constant"
    assert (filler.value, filler.min, filler.max) == (0.0, 0.0, 1.0)
    assert (filler.mean, filler.std, filler.sparse) == (0.0, 1.0, -1)
    assert filler.variance_norm == pb.FillerParameter.FAN_IN


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

def _small_net():
    net = pb.NetParameter(name="tiny")
    data = net.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add(dim=[2, 3, 8, 8])

    conv = net.layer.add(name="conv", type="Convolution", bottom=["data"], top=["conv"])
    conv.param.add(lr_mult=1)
    conv.param.add(lr_mult=2, decay_mult=0)
    conv.convolution_param.num_output = 4
    conv.convolution_param.kernel_size.append(3)
    conv.convolution_param.pad.append(1)
    conv.convolution_param.weight_filler.type = "xavier"
    conv.blobs.add(shape=pb.BlobShape(dim=[4, 3, 3, 3]), data=[0.5] * 108)
    conv.blobs.add(shape=pb.BlobShape(dim=[4]), data=[0.0, 1.0, -1.0, 2.5])

    pool = net.layer.add(name="pool", type="Pooling", bottom=["conv"], top=["pool"])
    pool.pooling_param.pool = pb.PoolingParameter.AVE
    pool.pooling_param.kernel_size = 2
    pool.pooling_param.stride = 2

    loss = net.layer.add(name="loss", type="SoftmaxWithLoss",
                         bottom=["pool", "label"], top=["loss"])
    loss.include.add(phase=pb.TRAIN)
    loss.loss_param.ignore_label = 255
    loss.loss_weight.append(1.0)
    return net


def test_netparameter_binary_roundtrip():
    net = _small_net()
    data = net.SerializeToString()
    back = pb.NetParameter.FromString(data)
    assert back == net
    assert back.SerializeToString() == data
    assert list(back.layer[1].blobs[0].shape.dim) == [4, 3, 3, 3]
    assert back.layer[1].param[1].decay_mult == 0
    assert back.layer[1].param[0].decay_mult == 1  # default, not set


def test_netparameter_text_roundtrip():
    net = _small_net()
    text = text_format.MessageToString(net)
    assert 'type: "Convolution"' in text
    assert "pool: AVE" in text
    assert text_format.Parse(text, pb.NetParameter()) == net


def test_legacy_v1_and_v0_layers_parse():
    text = """
    name: "old"
    input: "data"
    input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
    layers {
      name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
      blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
      convolution_param { num_output: 4 kernel_size: 3 }
    }
    layers {
      layer { name: "pool1" type: "pool" pool: MAX kernelsize: 2 stride: 2 }
      bottom: "conv1" top: "pool1"
    }
    """
    net = text_format.Parse(text, pb.NetParameter())
    assert net.layers[0].type == pb.V1LayerParameter.CONVOLUTION
    assert list(net.layers[0].blobs_lr) == [1.0, 2.0]
    assert net.layers[1].layer.kernelsize == 2
    assert net.layers[1].layer.pool == pb.V0LayerParameter.MAX
    back = pb.NetParameter.FromString(net.SerializeToString())
    assert back == net
