"""ArgMax: top_k indices (and values), with and without axis; Caffe's tie order; no gradient."""
import numpy as np
import pytest

from layer_testing import run


def ranking(values):
    """Caffe's order: sort (value, index) pairs descending, so equal values put larger indices first."""
    return sorted(range(len(values)), key=lambda j: (values[j], j), reverse=True)


def argmax_ref(x, top_k, out_max_val):
    n = x.shape[0]
    flat = x.reshape(n, -1)
    out = np.zeros((n, 2 if out_max_val else 1, top_k) + (1,) * max(x.ndim - 3, 0))
    for i in range(n):
        order = ranking(list(flat[i]))[:top_k]
        for j, k in enumerate(order):
            out[i, 0, j] = k
            if out_max_val:
                out[i, 1, j] = flat[i, k]
    return out


def argmax_axis_ref(x, axis, top_k, out_max_val):
    moved = np.moveaxis(x, axis, -1)
    out = np.zeros(moved.shape[:-1] + (top_k,))
    for pos in np.ndindex(*moved.shape[:-1]):
        order = ranking(list(moved[pos]))[:top_k]
        out[pos] = [moved[pos][k] for k in order] if out_max_val else order
    return np.moveaxis(out, -1, axis)


def data(shape):
    # Few distinct values, so ties are common.
    return np.random.default_rng(3).integers(0, 4, shape).astype(float)


@pytest.mark.parametrize("shape", [(3, 10), (3, 2, 3, 2)])
@pytest.mark.parametrize("top_k,out_max_val", [(1, False), (1, True), (3, False), (4, True)])
def test_argmax_over_items(shape, top_k, out_max_val):
    x = data(shape)
    _, _, _, (y,) = run("ArgMax", [x], argmax_param={"top_k": top_k, "out_max_val": out_max_val})
    want = argmax_ref(x, top_k, out_max_val)
    assert y.shape == want.shape
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("top_k,out_max_val", [(1, False), (2, False), (2, True)])
def test_argmax_along_axis(axis, top_k, out_max_val):
    x = data((3, 4, 5))
    _, _, _, (y,) = run("ArgMax", [x], argmax_param={"axis": axis, "top_k": top_k,
                                                     "out_max_val": out_max_val})
    np.testing.assert_array_equal(y, argmax_axis_ref(x, axis % 3, top_k, out_max_val))


def test_argmax_shape_of_a_2d_bottom_is_padded_to_3_axes():
    _, _, _, (y,) = run("ArgMax", [data((2, 5))])
    assert y.shape == (2, 1, 1)


def test_argmax_top_k_too_large():
    from caffelite.errors import ConfigError
    with pytest.raises(ConfigError, match="top_k 6"):
        run("ArgMax", [data((2, 5))], argmax_param={"top_k": 6})


def test_argmax_has_no_gradient():
    layer, bottom, top, _ = run("ArgMax", [data((2, 5))])
    bottom[0].set_diff(3.0)
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), 3.0)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), 0.0)
    assert not layer.allow_force_backward(0) and layer.blobs == []
