"""Split, Concat and Slice against plain NumPy references."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from layer_testing import check_gradient, forward, make_layer, run, setup


@pytest.fixture
def rs():
    return np.random.default_rng(7)


# ---- Split ----------------------------------------------------------------------
def test_split_shares_data_and_sums_diffs(rs):
    x = rs.standard_normal((2, 3, 4))
    layer, bottom, top, outs = run("Split", [x], num_top=3)
    for t, out in zip(top, outs):
        assert t.shape == x.shape
        np.testing.assert_array_equal(out, x)
        assert np.shares_memory(t.data, bottom[0].data)
    diffs = [rs.standard_normal(x.shape) for _ in top]
    for t, d in zip(top, diffs):
        t.set_diff(d)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].cpu_diff(), diffs[0] + diffs[1] + diffs[2], rtol=1e-12)


def test_split_follows_bottom_reshape(rs):
    layer, bottom, top, _ = run("Split", [rs.standard_normal((2, 3))], num_top=2)
    bottom[0].reshape((5, 4))
    bottom[0].set_data(np.arange(20.0).reshape(5, 4))
    outs = forward(layer, bottom, top)
    for out in outs:
        np.testing.assert_array_equal(out, np.arange(20.0).reshape(5, 4))


@pytest.mark.parametrize("num_top", [1, 2, 4])
def test_split_gradient(rs, num_top):
    layer = make_layer("Split")
    bottom, top = setup(layer, [rs.standard_normal((2, 3))], num_top=num_top)
    assert check_gradient(layer, bottom, top) > 0


@pytest.mark.parametrize("type", ["Split", "Concat", "Slice"])
def test_not_in_place(type):
    b = Blob((3, 2), np.float64)
    with pytest.raises(ConfigError, match="in place"):
        make_layer(type).layer_setup([b], [b])


# ---- Concat ---------------------------------------------------------------------
def ref_concat(arrays, axis):
    axis = axis % arrays[0].ndim
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = np.empty(shape)
    offset = 0
    for a in arrays:
        for idx in np.ndindex(*a.shape):
            pos = list(idx)
            pos[axis] += offset
            out[tuple(pos)] = a[idx]
        offset += a.shape[axis]
    return out


@pytest.mark.parametrize("axis,shapes", [
    (1, [(2, 1, 3), (2, 4, 3), (2, 2, 3)]),
    (0, [(1, 3, 2), (3, 3, 2)]),
    (-1, [(2, 2, 1), (2, 2, 3)]),
])
def test_concat_forward_backward(rs, axis, shapes, device):
    arrays = [rs.standard_normal(s) for s in shapes]
    layer, bottom, top, (y,) = run("Concat", arrays, concat_param={"axis": axis}, device=device)
    np.testing.assert_array_equal(y, ref_concat(arrays, axis))
    dy = rs.standard_normal(y.shape)
    top[0].set_diff(dy)
    layer.backward(top, [True] * len(arrays), bottom)
    offset = 0
    ax = axis % len(shapes[0])
    for b, a in zip(bottom, arrays):
        n = a.shape[ax]
        np.testing.assert_array_equal(b.cpu_diff(), np.take(dy, range(offset, offset + n), axis=ax))
        offset += n


def test_concat_legacy_concat_dim(rs):
    arrays = [rs.standard_normal((1, 2)), rs.standard_normal((3, 2))]
    _, _, _, (y,) = run("Concat", arrays, concat_param={"concat_dim": 0})
    np.testing.assert_array_equal(y, ref_concat(arrays, 0))


def test_concat_single_bottom_shares(rs):
    x = rs.standard_normal((2, 3))
    _, bottom, top, (y,) = run("Concat", [x])
    np.testing.assert_array_equal(y, x)
    assert np.shares_memory(top[0].data, bottom[0].data)
    assert np.shares_memory(top[0].diff, bottom[0].diff)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_concat_gradient(rs, axis):
    shapes = [[2, 3, 2], [2, 3, 2], [2, 3, 2]]
    for s, n in zip(shapes, (1, 2, 3)):
        s[axis] = n
    layer = make_layer("Concat", concat_param={"axis": axis})
    bottom, top = setup(layer, [rs.standard_normal(s) for s in shapes])
    assert check_gradient(layer, bottom, top) > 0


def test_concat_errors(rs):
    with pytest.raises(ConfigError, match=r"\(2, 3, 4\).*\(2, 2, 5\)|\(2, 2, 5\).*\(2, 3, 4\)"):
        run("Concat", [rs.standard_normal((2, 3, 4)), rs.standard_normal((2, 2, 5))])
    with pytest.raises(ConfigError, match="concat_dim"):
        run("Concat", [rs.standard_normal((2, 3))] * 2, concat_param={"axis": 1, "concat_dim": 1})
    with pytest.raises(ConfigError, match="out of range"):
        run("Concat", [rs.standard_normal((2, 3))] * 2, concat_param={"axis": 2})


# ---- Slice ----------------------------------------------------------------------
@pytest.mark.parametrize("fields,num_top,shape,axis,bounds", [
    ({}, 3, (2, 6, 2), 1, [0, 2, 4, 6]),
    ({"slice_param": {"slice_point": [1, 4]}}, 3, (2, 6, 2), 1, [0, 1, 4, 6]),
    ({"slice_param": {"axis": 0, "slice_point": [3]}}, 2, (5, 2), 0, [0, 3, 5]),
    ({"slice_param": {"axis": -1}}, 2, (2, 3, 4), 2, [0, 2, 4]),
    ({"slice_param": {"slice_dim": 2, "slice_point": [1]}}, 2, (2, 2, 3), 2, [0, 1, 3]),
])
def test_slice_forward_backward(rs, fields, num_top, shape, axis, bounds):
    x = rs.standard_normal(shape)
    layer, bottom, top, outs = run("Slice", [x], num_top=num_top, **fields)
    diffs = []
    for k, (t, out) in enumerate(zip(top, outs)):
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(bounds[k], bounds[k + 1])
        np.testing.assert_array_equal(out, x[tuple(idx)])
        diffs.append(rs.standard_normal(out.shape))
        t.set_diff(diffs[-1])
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), np.concatenate(diffs, axis=axis))


@pytest.mark.parametrize("fields,num_top", [
    ({}, 2), ({"slice_param": {"axis": 2, "slice_point": [1, 2]}}, 3), ({}, 1)])
def test_slice_gradient(rs, fields, num_top):
    layer = make_layer("Slice", **fields)
    bottom, top = setup(layer, [rs.standard_normal((2, 4, 3))], num_top=num_top)
    assert check_gradient(layer, bottom, top) > 0


def test_slice_errors(rs):
    x = rs.standard_normal((2, 5))
    with pytest.raises(ConfigError, match="divisible"):
        run("Slice", [x], num_top=2)
    with pytest.raises(ConfigError, match="slice_point"):
        run("Slice", [x], num_top=3, slice_param={"slice_point": [3]})
    with pytest.raises(ConfigError, match="increase strictly"):
        run("Slice", [x], num_top=3, slice_param={"slice_point": [3, 2]})
    with pytest.raises(ConfigError, match="increase strictly"):
        run("Slice", [x], num_top=2, slice_param={"slice_point": [6]})
    with pytest.raises(ConfigError, match="increase strictly"):
        run("Slice", [x], num_top=2, slice_param={"slice_point": [0]})
