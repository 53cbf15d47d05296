"""HDF5Output: rows appended per forward, the file installed whole at close."""
import gc

import h5py
import numpy as np
import pytest

from layer_testing import forward, make_layer, setup
from caffelite.errors import ConfigError, DataError


def output_layer(path, data, label, dtype=np.float64):
    layer = make_layer("HDF5Output", dtype=dtype, hdf5_output_param={"file_name": str(path)})
    bottom, top = setup(layer, [data, label], num_top=0)
    return layer, bottom, top


def test_appends_rows_and_installs_at_close(tmp_path):
    rng = np.random.default_rng(0)
    target = tmp_path / "out" / "features.h5"
    batches = [(rng.standard_normal((3, 2, 4, 4)), rng.integers(0, 5, 3).astype(float)) for _ in range(3)]
    layer, bottom, top = output_layer(target, *batches[0])
    for data, label in batches:
        bottom[0].set_data(data)
        bottom[1].set_data(label)
        forward(layer, bottom, top)
        assert not target.exists()  # only the temporary file grows meanwhile
    layer.backward(top, [True, True], bottom)  # nothing to propagate, and no error
    layer.close()
    layer.close()  # twice is fine
    with h5py.File(target, "r") as f:
        assert sorted(f) == ["data", "label"]
        np.testing.assert_array_equal(f["data"][()], np.concatenate([b[0] for b in batches]))
        np.testing.assert_array_equal(f["label"][()], np.concatenate([b[1] for b in batches]))
        assert f["data"].dtype == np.float64
    assert [p.name for p in target.parent.iterdir()] == ["features.h5"]  # no temporary left
    with pytest.raises(ConfigError, match="is closed"):
        layer.forward(bottom, top)


def test_previous_file_kept_until_close_and_readable_by_hdf5_data(tmp_path):
    target = tmp_path / "out.h5"
    with h5py.File(target, "w") as f:
        f["data"] = np.zeros(1)
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    layer, bottom, top = output_layer(target, data, np.arange(6.0), dtype=np.float32)
    forward(layer, bottom, top)
    with h5py.File(target, "r") as f:
        assert f["data"].shape == (1,)  # the old file, untouched
    layer.close()
    (tmp_path / "list.txt").write_text("out.h5\n")
    reader = make_layer("HDF5Data", top=["data", "label"], dtype=np.float32,
                        hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 6})
    _, rtop = setup(reader, [], 2)
    got_data, got_label = forward(reader, [], rtop)
    np.testing.assert_array_equal(got_data, data)
    np.testing.assert_array_equal(got_label, np.arange(6.0))


def test_abandoned_layer_still_installs_its_file(tmp_path):
    layer, bottom, top = output_layer(tmp_path / "late.h5", np.ones((2, 3)), np.ones(2))
    forward(layer, bottom, top)
    del layer, bottom, top
    gc.collect()
    with h5py.File(tmp_path / "late.h5", "r") as f:
        assert f["data"].shape == (2, 3)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="file_name is not set"):
        layer = make_layer("HDF5Output", hdf5_output_param={})
        setup(layer, [np.ones((2, 1)), np.ones(2)], num_top=0)
    with pytest.raises(ConfigError, match="takes 2 bottom"):
        layer = make_layer("HDF5Output", hdf5_output_param={"file_name": str(tmp_path / "y.h5")})
        setup(layer, [np.ones((2, 1))], num_top=0)
    with pytest.raises(ConfigError, match="data has .* rows but label"):
        output_layer(tmp_path / "z.h5", np.ones((3, 1)), np.ones(2))
    assert not list(tmp_path.iterdir())  # failed set-ups leave no file behind
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="cannot write HDF5 output file"):
        output_layer(tmp_path / "a_file" / "out.h5", np.ones((2, 1)), np.ones(2))
    layer, bottom, top = output_layer(tmp_path / "shape.h5", np.ones((2, 3)), np.ones(2))
    forward(layer, bottom, top)
    bottom[0].reshape((2, 4))
    with pytest.raises(DataError, match=r"rows of data changed shape from \(3,\) to \(4,\)"):
        forward(layer, bottom, top)
    layer.close()
