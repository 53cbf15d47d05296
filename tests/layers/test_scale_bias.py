"""Scale and Bias: learned or bottom[1] operands, axis/num_axes variants, gradients, in place."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from layer_testing import check_gradient, make_layer, run

SHAPE = (2, 3, 4, 5)
GAUSS = {"type": "gaussian", "std": 1.0, "mean": 0.5}


def data(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def broadcast_ref(x, operand, axis, op):
    """out[idx] = op(x[idx], operand[idx[axis:axis + operand.ndim]]), by loops."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        out[idx] = op(x[idx], operand[idx[axis:axis + operand.ndim]])
    return out


# (axis, num_axes) -> the learned blob's shape for SHAPE
LEARNED_CASES = [(1, 1, (3,)), (1, 2, (3, 4)), (2, 2, (4, 5)), (-1, 1, (5,)), (0, 1, (2,)),
                 (1, -1, (3, 4, 5)), (1, 0, ()), (0, -1, SHAPE)]


@pytest.mark.parametrize("axis,num_axes,shape", LEARNED_CASES)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned(axis, num_axes, shape, bias_term):
    x = data()
    layer, bottom, top, (y,) = run("Scale", [x], scale_param={
        "axis": axis, "num_axes": num_axes, "filler": GAUSS, "bias_term": bias_term, "bias_filler": GAUSS})
    assert [b.shape for b in layer.blobs] == [shape] * (2 if bias_term else 1)
    start = 0 if not shape else axis % 4
    ref = broadcast_ref(x, layer.blobs[0].cpu_data(), start, np.multiply)
    if bias_term:
        ref = broadcast_ref(ref, layer.blobs[1].cpu_data(), start, np.add)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_scale_default_fillers_are_identity():
    x = data()
    layer, _, _, (y,) = run("Scale", [x], scale_param={"bias_term": True})
    np.testing.assert_array_equal(layer.blobs[0].cpu_data(), 1)
    np.testing.assert_array_equal(layer.blobs[1].cpu_data(), 0)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("axis,shape", [(1, (3,)), (1, (3, 4)), (0, (2, 3)), (2, (4, 5)), (1, ()),
                                        (-2, (4, 5))])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_from_second_bottom(axis, shape, bias_term):
    x, s = data(), data(shape, seed=1)
    layer, bottom, top, (y,) = run("Scale", [x, s], scale_param={
        "axis": axis, "bias_term": bias_term, "bias_filler": GAUSS})
    assert [b.shape for b in layer.blobs] == ([shape] if bias_term else [])
    start = 0 if not shape else axis % 4
    ref = broadcast_ref(x, s, start, np.multiply)
    if bias_term:
        ref = broadcast_ref(ref, layer.blobs[0].cpu_data(), start, np.add)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_scale_gradient_to_second_bottom_is_written_not_added():
    x, s = data(), data((3,), seed=1)
    layer, bottom, top, _ = run("Scale", [x, s])
    bottom[1].set_diff(100.0)
    top[0].set_diff(np.ones(SHAPE))
    layer.backward(top, [False, True], bottom)
    np.testing.assert_allclose(bottom[1].cpu_diff(), x.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_scale_shape_mismatch():
    with pytest.raises(ConfigError, match="does not match"):
        run("Scale", [data(), data((4,))])
    with pytest.raises(ConfigError, match="extends past"):
        run("Scale", [data()], scale_param={"axis": 2, "num_axes": 3})


def in_place_results(type, bottom_arrays, **kwargs):
    """(y, dx, param diffs, bottom[1] diff) with and without top == bottom."""
    results = []
    dy = data(seed=9)
    for in_place in (False, True):
        layer = make_layer(type, **kwargs)
        bottom = [Blob(np.shape(a), np.float64) for a in bottom_arrays]
        for blob, a in zip(bottom, bottom_arrays):
            blob.set_data(a)
        top = [bottom[0]] if in_place else [Blob((), np.float64)]
        layer.layer_setup(bottom, top)
        layer.forward(bottom, top)
        y = top[0].cpu_data().copy()
        top[0].set_diff(dy)
        for b in layer.blobs:
            b.set_diff(0.5)
        layer.backward(top, [True] * len(bottom), bottom)
        results.append((y, bottom[0].cpu_diff().copy(), [b.cpu_diff().copy() for b in layer.blobs],
                        [b.cpu_diff().copy() for b in bottom[1:]]))
    return results


@pytest.mark.parametrize("type,bottoms,param", [
    ("Scale", [data()], {"scale_param": {"bias_term": True, "filler": GAUSS, "bias_filler": GAUSS}}),
    ("Scale", [data(), data((3, 4), 1)], {"scale_param": {"bias_term": True, "bias_filler": GAUSS}}),
    ("Scale", [data()], {"scale_param": {"num_axes": -1, "filler": GAUSS}}),
    ("Bias", [data()], {"bias_param": {"filler": GAUSS}}),
    ("Bias", [data(), data((3,), 1)], {})])
def test_in_place_matches(type, bottoms, param):
    (y, dx, pdiffs, bdiffs), (y2, dx2, pdiffs2, bdiffs2) = in_place_results(type, bottoms, **param)
    np.testing.assert_allclose(y2, y, rtol=1e-12)
    np.testing.assert_allclose(dx2, dx, rtol=1e-12)
    for a, b in zip(pdiffs2 + bdiffs2, pdiffs + bdiffs):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert all(np.all(p != 0.5) for p in pdiffs)  # gradients were added to the 0.5


@pytest.mark.parametrize("axis,num_axes,shape", LEARNED_CASES)
def test_bias_learned(axis, num_axes, shape):
    x = data()
    layer, bottom, top, (y,) = run("Bias", [x], bias_param={
        "axis": axis, "num_axes": num_axes, "filler": GAUSS})
    assert [b.shape for b in layer.blobs] == [shape]
    start = 0 if not shape else axis % 4
    np.testing.assert_allclose(y, broadcast_ref(x, layer.blobs[0].cpu_data(), start, np.add), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_bias_default_filler_is_zero():
    x = data()
    layer, _, _, (y,) = run("Bias", [x])
    np.testing.assert_array_equal(layer.blobs[0].cpu_data(), 0)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("axis,shape", [(1, (3,)), (1, (3, 4, 5)), (2, (4,)), (1, ())])
def test_bias_from_second_bottom(axis, shape):
    x, b = data(), data(shape, seed=1)
    layer, bottom, top, (y,) = run("Bias", [x, b], bias_param={"axis": axis})
    assert layer.blobs == []
    start = 0 if not shape else axis
    np.testing.assert_allclose(y, broadcast_ref(x, b, start, np.add), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_bias_shape_mismatch():
    with pytest.raises(ConfigError, match="does not match"):
        run("Bias", [data(), data((3, 5))])
