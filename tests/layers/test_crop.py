"""Crop: offsets per axis, reference loops, gradients, errors, real-Caffe numbers."""
import itertools

import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, run


def crop_ref(a, ref_shape, axis, offsets):
    """Element by element: top[i] = a[i + offset] on the cropped axes."""
    axes = len(a.shape)
    offs = [0] * axes
    for i in range(axis, axes):
        offs[i] = 0 if not offsets else offsets[0 if len(offsets) == 1 else i - axis]
    shape = [a.shape[i] if i < axis else ref_shape[i] for i in range(axes)]
    top = np.zeros(shape)
    for idx in itertools.product(*(range(s) for s in shape)):
        top[idx] = a[tuple(i + o for i, o in zip(idx, offs))]
    return top


@pytest.mark.parametrize("axis,offsets", [
    (2, []), (2, [1]), (2, [1, 2]), (1, [1, 0, 2]), (0, [1]), (-1, [3]), (3, [])])
def test_forward_and_gradient(axis, offsets):
    rs = np.random.default_rng(0)
    a = rs.standard_normal((3, 4, 5, 6))
    b = rs.standard_normal((2, 2, 3, 2))
    param = {"axis": axis}
    if offsets:
        param["offset"] = offsets
    layer, bottom, top, (y,) = run("Crop", [a, b], crop_param=param)
    expected = crop_ref(a, b.shape, axis % 4, offsets)
    np.testing.assert_array_equal(y, expected)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_reference_bottom_gets_zero_gradient():
    rs = np.random.default_rng(1)
    a, b = rs.standard_normal((1, 2, 5, 5)), rs.standard_normal((1, 2, 3, 3))
    layer, bottom, top, (y,) = run("Crop", [a, b], crop_param={"offset": [1]})
    top[0].set_diff(np.ones(y.shape))
    bottom[1].set_diff(7.0)
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[1].cpu_diff(), 0)
    expected = np.zeros((1, 2, 5, 5))
    expected[:, :, 1:4, 1:4] = 1
    np.testing.assert_array_equal(bottom[0].cpu_diff(), expected)


@pytest.mark.parametrize("b_shape,param,message", [
    ((1, 2, 3, 3), {"offset": [3]}, "invalid crop"),
    ((1, 2, 6, 3), {}, "invalid crop"),
    ((1, 2, 3, 3), {"offset": [1, 1, 1]}, "offsets"),
    ((2, 3, 3), {}, "same number of axes"),
])
def test_errors(b_shape, param, message):
    with pytest.raises(ConfigError, match=message):
        run("Crop", [np.zeros((1, 2, 5, 5)), np.zeros(b_shape)], crop_param=param)


def test_float32_keeps_dtype():
    a = np.arange(50, dtype=np.float32).reshape(1, 2, 5, 5)
    _, _, _, (y,) = run("Crop", [a, np.zeros((1, 2, 2, 2), np.float32)], dtype=np.float32,
                        crop_param={"offset": [2]})
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, a[:, :, 2:4, 2:4])


def test_matches_caffe():
    a, b, expected = caffe_blob("deconv"), caffe_blob("slice_b"), caffe_blob("crop")
    _, _, _, (y,) = run("Crop", [a, b], dtype=np.float32, crop_param={"axis": 2, "offset": [1]})
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)
