"""Data, HDF5Data, MemoryData, DummyData and Input layers."""
import json
import logging
import time

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from conftest import FIXTURES
from layer_testing import forward, make_layer, setup
from caffelite.blob import Blob
from caffelite.data.datum import encode_datum
from caffelite.data.lmdb_source import iter_records, write_lmdb
from caffelite.data.prefetch import Prefetcher
from caffelite.errors import ConfigError, DataError
from caffelite.layers.base import TEST, TRAIN, LayerContext
from caffelite.proto import pb
from caffelite.registry import LAYERS

IMAGES = FIXTURES / "images"
RAW32 = str(IMAGES / "lmdb_raw_32")


@pytest.fixture
def layers():
    """Layers made through this fixture are closed after the test."""
    made = []

    def build(type, num_top=2, **kwargs):
        layer = make_layer(type, **kwargs)
        made.append(layer)
        bottom, top = setup(layer, [], num_top)
        return layer, top
    yield build
    for layer in made:
        layer.close()


def run_batches(layer, top, k):
    return [forward(layer, [], top) for _ in range(k)]


def float_features(db):
    out = []
    for _, value in iter_records(str(db)):
        d = pb.Datum()
        d.ParseFromString(value)
        out.append(np.asarray(d.float_data, np.float32).reshape(d.channels, d.height, d.width))
    return np.stack(out)


@pytest.mark.parametrize("name, tolerance", [("raw", 0.0), ("enc", 1.0), ("gray", 1.0 / 256)])
def test_reproduces_caffe_data_layer(monkeypatch, name, tolerance):
    """data_net.prototxt's layers give the blobs Caffe extracted (TEST phase, float32)."""
    monkeypatch.chdir(IMAGES)  # its sources and mean_file are relative to that folder
    net = text_format.Parse((IMAGES / "data_net.prototxt").read_text(), pb.NetParameter())
    param = next(lp for lp in net.layer if lp.name == name)
    layer = LAYERS.get("Data")(param, LayerContext(phase=TEST, dtype=np.dtype(np.float32), seed=5))
    top = [Blob(()), Blob(())]
    layer.layer_setup([], top)
    try:
        outs = run_batches(layer, top, 3)
    finally:
        layer.close()
    data = np.concatenate([o[0] for o in outs])
    labels = np.concatenate([o[1] for o in outs])
    expected = float_features(IMAGES / "data_features" / name)
    assert data.shape == expected.shape and data.dtype == np.float32
    # raw is exact; decoded images may differ by one grey level times the scale
    np.testing.assert_allclose(data, expected, rtol=0, atol=tolerance)
    assert labels.tolist() == [i % 2 for i in range(24)]


def data_layer(build, source=RAW32, batch_size=5, phase=TEST, seed=7, transform=None, num_top=2,
               **extra):
    return build("Data", num_top=num_top, phase=phase, seed=seed, dtype=np.float32,
                 data_param={"source": source, "batch_size": batch_size, "backend": "LMDB", **extra},
                 transform_param=transform or {})


def test_wraps_around_in_key_order(layers):
    layer, top = data_layer(layers, batch_size=10)
    labels = np.concatenate([o[1] for o in run_batches(layer, top, 3)])
    assert labels.tolist() == [i % 24 % 2 for i in range(30)]
    assert top[0].shape == (10, 3, 32, 32)


def test_exact_resume_with_random_transforms(layers):
    transform = {"crop_size": 24, "mirror": True, "scale": 0.5}
    a, top_a = data_layer(layers, phase=TRAIN, transform=transform, prefetch=3)
    run_batches(a, top_a, 3)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe
    assert state["batches"] == 3
    expected = run_batches(a, top_a, 4)
    b, top_b = data_layer(layers, phase=TRAIN, transform=transform, prefetch=1, seed=99)
    run_batches(b, top_b, 1)  # whatever it did before is dropped by the restore
    b.load_state_dict(state)
    for want, got in zip(expected, run_batches(b, top_b, 4)):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])


def test_random_stream_depends_on_seed_not_timing(layers):
    transform = {"crop_size": 20, "mirror": True}
    a, ta = data_layer(layers, phase=TRAIN, transform=transform, prefetch=1)
    b, tb = data_layer(layers, phase=TRAIN, transform=transform, prefetch=6)
    c, tc = data_layer(layers, phase=TRAIN, transform=transform, seed=8)
    outs_a, outs_b, outs_c = (run_batches(x, t, 3) for x, t in ((a, ta), (b, tb), (c, tc)))
    for x, y, z in zip(outs_a, outs_b, outs_c):
        np.testing.assert_array_equal(x[0], y[0])
    assert any(not np.array_equal(x[0], z[0]) for x, z in zip(outs_a, outs_c))


def test_shards_by_rank_in_train_phase(layers):
    seen = []
    for rank in (0, 1):
        layer = make_layer("Data", phase=TRAIN, dtype=np.float32,
                           data_param={"source": RAW32, "batch_size": 4, "backend": "LMDB"})
        layer.ctx = LayerContext(phase=TRAIN, dtype=np.dtype(np.float32), seed=1, rank=rank, world_size=2)
        top = [Blob(()), Blob(())]
        layer.layer_setup([], top)
        seen.append(forward(layer, [], top)[0])
        layer.close()
    full, top = data_layer(layers, batch_size=8)
    everything = forward(full, [], top)[0]
    np.testing.assert_array_equal(seen[0], everything[0::2])
    np.testing.assert_array_equal(seen[1], everything[1::2])


def test_rand_skip_starts_inside_the_database(layers):
    layer, top = data_layer(layers, batch_size=24, rand_skip=20, seed=3)
    skip = layer.state_dict()["skip"]
    assert 0 <= skip < 20
    full, top_full = data_layer(layers, batch_size=24)
    np.testing.assert_array_equal(forward(layer, [], top)[0],
                                  np.roll(forward(full, [], top_full)[0], -skip, axis=0))


def test_prefetcher_waits_logs_once_and_propagates_errors(caplog):
    caplog.set_level(logging.INFO, logger="caffelite")

    def slow(index, batch):
        time.sleep(0.02)
        if index == 3:
            raise DataError("broken record")
        batch.data = np.full(2, index)

    prefetcher = Prefetcher(slow, depth=2)
    for i in range(3):
        batch = prefetcher.next()
        assert batch.index == i and (batch.data == i).all()
        prefetcher.release(batch)
    assert [r.getMessage() for r in caplog.records].count("Waiting for data") == 1
    with pytest.raises(DataError, match="broken record") as first:
        prefetcher.next()
    with pytest.raises(DataError) as again:
        prefetcher.next()
    assert again.value is first.value
    prefetcher.close()


def test_close_stops_the_thread(layers):
    layer, top = data_layer(layers)
    run_batches(layer, top, 2)
    thread = layer._prefetcher._thread
    assert thread.daemon
    layer.close()
    assert not thread.is_alive()
    with pytest.raises(ConfigError, match="closed"):
        layer.forward([], top)


def test_single_top_and_backward_is_noop(layers):
    layer, top = data_layer(layers, num_top=1)
    (out,) = forward(layer, [], top)
    assert out.shape == (5, 3, 32, 32)
    layer.backward(top, [], [])


def test_leveldb_and_missing_database_messages(layers, tmp_path):
    with pytest.raises(ConfigError, match=r"LEVELDB is not supported; convert the database to LMDB "
                                          r"\(e\.g\. with caffelite convert_imageset, or re-create it "
                                          r"with backend: LMDB\)"):
        layers("Data", data_param={"source": RAW32, "batch_size": 2, "backend": "LEVELDB"})
    with pytest.raises(DataError, match="does not exist.*run scripts/get_mnist.py or caffelite "
                                        "convert_imageset to create it"):
        data_layer(layers, source=str(tmp_path / "missing_lmdb"))
    # An unset backend (Caffe's default LEVELDB) still reads an LMDB.
    layer, top = layers("Data", data_param={"source": RAW32, "batch_size": 2})
    assert forward(layer, [], top)[0].shape == (2, 3, 32, 32)


def test_corrupt_record_raises_in_forward(layers, tmp_path):
    good = encode_datum(np.zeros((1, 2, 2), np.uint8), 0)
    bad = pb.Datum(channels=1, height=2, width=2, data=b"\x00\x01\x02").SerializeToString()
    db = str(tmp_path / "corrupt_lmdb")
    write_lmdb(db, [(b"00000000", good), (b"00000001", bad), (b"00000002", good)])
    layer, top = data_layer(layers, source=db, batch_size=3)
    for _ in range(2):  # the worker's error reaches every later forward too
        with pytest.raises(DataError, match=r"record '00000001' of '.*corrupt_lmdb' holds 3 bytes"):
            layer.forward([], top)


def test_mixed_sizes_in_a_batch(layers, tmp_path):
    db = str(tmp_path / "mixed")
    write_lmdb(db, [(b"a", encode_datum(np.zeros((1, 2, 2), np.uint8))),
                    (b"b", encode_datum(np.zeros((1, 3, 3), np.uint8)))])
    layer, top = data_layer(layers, source=db, batch_size=2)
    with pytest.raises(DataError, match="record 'b'.*1x3x3 but the batch's first item is 1x2x2"):
        layer.forward([], top)


# ---- HDF5Data ---------------------------------------------------------------
H5LIST = str(FIXTURES / "net" / "h5list.txt")


def test_hdf5_data_reads_the_fixture(layers):
    with h5py.File(FIXTURES / "net" / "input.h5", "r") as f:
        data, label = f["data"][()], f["label"][()]
    layer, top = layers("HDF5Data", top=["data", "label"],
                        hdf5_data_param={"source": H5LIST, "batch_size": 3})
    assert top[0].shape == (3, 3, 16, 16) and top[1].shape == (3,)
    outs = run_batches(layer, top, 4)
    rows = [i % 8 for i in range(12)]
    np.testing.assert_array_equal(np.concatenate([o[0] for o in outs]), data[rows])
    np.testing.assert_array_equal(np.concatenate([o[1] for o in outs]), label[rows])


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, values in datasets.items():
            f[name] = values


def test_hdf5_shuffle_epochs_and_resume(layers, tmp_path):
    for i in range(3):
        write_h5(tmp_path / f"part{i}.h5", data=np.arange(5 * i, 5 * i + 5, dtype=np.float32)[:, None],
                 label=np.arange(5 * i, 5 * i + 5, dtype=np.float32))
    (tmp_path / "list.txt").write_text("part0.h5\npart1.h5\n\npart2.h5\n")
    kwargs = dict(top=["data", "label"], seed=11,
                  hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 5, "shuffle": True})
    layer, top = layers("HDF5Data", **kwargs)
    labels = np.concatenate([o[1] for o in run_batches(layer, top, 6)])
    epochs = labels.reshape(2, 15)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(15))
    assert epochs[0].tolist() != list(range(15)) and epochs[0].tolist() != epochs[1].tolist()
    state = layer.state_dict()
    expected = run_batches(layer, top, 2)
    other, other_top = layers("HDF5Data", **{**kwargs, "seed": 12})
    other.load_state_dict(state)
    for want, got in zip(expected, run_batches(other, other_top, 2)):
        np.testing.assert_array_equal(want[1], got[1])


def test_hdf5_any_tops_in_the_net_dtype_read_ahead(layers, tmp_path, device):
    """Three datasets of other dtypes and names: three tops in the net's dtype, from the
    buffers a worker thread read ahead (on a GPU, copied through the device feed)."""
    write_h5(tmp_path / "a.h5", image=np.arange(24, dtype=np.float64).reshape(6, 2, 2),
             cls=np.arange(6, dtype=np.int64), weight=np.linspace(0, 1, 6)[:, None])
    (tmp_path / "list.txt").write_text("a.h5\n")
    layer, top = layers("HDF5Data", num_top=3, top=["image", "cls", "weight"], dtype=np.float32,
                        device=device, hdf5_data_param={"source": str(tmp_path / "list.txt"),
                                                        "batch_size": 4})
    first, second = run_batches(layer, top, 2)
    assert [blob.data.dtype for blob in top] == [np.float32] * 3
    np.testing.assert_array_equal(second[0], np.arange(24, dtype=np.float32).reshape(6, 2, 2)[[4, 5, 0, 1]])
    np.testing.assert_array_equal(second[1], [4, 5, 0, 1])
    np.testing.assert_allclose(second[2][:, 0], np.linspace(0, 1, 6)[[4, 5, 0, 1]], rtol=1e-7)
    if not device.is_gpu:   # the CPU's top is the buffer itself
        assert np.shares_memory(top[0].data, layer._current.buffer("image"))


def test_hdf5_errors(layers, tmp_path):
    with pytest.raises(DataError, match="list file .* does not exist"):
        layers("HDF5Data", top=["data"], hdf5_data_param={"source": str(tmp_path / "no.txt"), "batch_size": 1})
    (tmp_path / "list.txt").write_text("missing.h5\n")
    with pytest.raises(DataError, match="'missing.h5' listed in .* does not exist"):
        layers("HDF5Data", top=["data"], hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 1})
    write_h5(tmp_path / "a.h5", data=np.zeros((4, 2)), label=np.zeros(3))
    (tmp_path / "list.txt").write_text("a.h5\n")
    with pytest.raises(DataError, match="different row counts"):
        layers("HDF5Data", top=["data", "label"],
               hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 1})
    with pytest.raises(DataError, match="has no dataset 'labels'.*label"):
        layers("HDF5Data", top=["data", "labels"],
               hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 1})


# ---- Input, DummyData, MemoryData ------------------------------------------------
def test_input_shapes(layers):
    _, top = layers("Input", top=["a", "b"], input_param={"shape": [{"dim": [2, 3]}]})
    assert [t.shape for t in top] == [(2, 3), (2, 3)]
    layer, top = layers("Input", top=["a", "b"],
                        input_param={"shape": [{"dim": [1, 3, 4, 4]}, {"dim": [1]}]})
    assert [t.shape for t in top] == [(1, 3, 4, 4), (1,)]
    top[0].reshape((5, 3, 4, 4))  # a user's reshape survives the net's reshape calls
    layer.reshape([], top)
    assert top[0].shape == (5, 3, 4, 4)
    with pytest.raises(ConfigError, match="2 shapes for 3 tops"):
        layers("Input", num_top=3, input_param={"shape": [{"dim": [1]}, {"dim": [2]}]})


def test_dummy_data(layers):
    layer, top = layers("DummyData", num_top=3, dummy_data_param={
        "shape": [{"dim": [2, 3]}, {"dim": [4]}, {"dim": [1, 1, 2, 2]}],
        "data_filler": [{"type": "constant", "value": 1.5}, {"type": "gaussian"}, {"type": "constant"}]})
    first = forward(layer, [], top)
    second = forward(layer, [], top)
    assert [o.shape for o in first] == [(2, 3), (4,), (1, 1, 2, 2)]
    assert (first[0] == 1.5).all() and (first[2] == 0).all()
    assert not np.array_equal(first[1], second[1])  # non-constant fillers refill
    _, top = layers("DummyData", num_top=2, dummy_data_param={
        "num": [2], "channels": [3, 1], "height": [4], "width": [5]})
    assert [t.shape for t in top] == [(2, 3, 4, 5), (2, 1, 4, 5)]
    assert all((t.cpu_data() == 0).all() for t in top)
    with pytest.raises(ConfigError, match="2 data_filler entries for 3 tops"):
        layers("DummyData", num_top=3, dummy_data_param={
            "shape": [{"dim": [1]}], "data_filler": [{"type": "constant"}, {"type": "constant"}]})


def test_memory_data(layers):
    data = np.arange(5 * 2 * 3 * 3, dtype=np.float64).reshape(5, 2, 3, 3)
    labels = np.arange(5.0)
    layer, top = layers("MemoryData", transform_param={"scale": 2.0},
                        memory_data_param={"batch_size": 2, "channels": 2, "height": 3, "width": 3})
    with pytest.raises(ConfigError, match="reset"):
        layer.forward([], top)
    with pytest.raises(ConfigError, match="expected"):
        layer.reset(data[:, :1], labels)
    layer.reset(data, labels)
    outs = run_batches(layer, top, 3)
    order = [0, 1, 2, 3, 4, 0]
    np.testing.assert_array_equal(np.concatenate([o[0] for o in outs]), data[order] * 2)
    np.testing.assert_array_equal(np.concatenate([o[1] for o in outs]), labels[order])
    assert layer.state_dict()["pos"] == 1
