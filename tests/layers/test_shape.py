"""Flatten, Reshape and Silence."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from layer_testing import check_gradient, forward, make_layer, run, setup


@pytest.fixture
def rs():
    return np.random.default_rng(13)


def assert_shares(top, bottom):
    assert np.shares_memory(top.data, bottom.data)
    assert np.shares_memory(top.diff, bottom.diff)


# ---- Flatten ----------------------------------------------------------------------
@pytest.mark.parametrize("fields,expected", [
    ({}, (2, 60)),
    ({"flatten_param": {"axis": 2}}, (2, 3, 20)),
    ({"flatten_param": {"axis": 1, "end_axis": 2}}, (2, 12, 5)),
    ({"flatten_param": {"axis": 0, "end_axis": -2}}, (24, 5)),
    ({"flatten_param": {"axis": -3, "end_axis": -3}}, (2, 3, 4, 5)),
])
def test_flatten(rs, fields, expected):
    x = rs.standard_normal((2, 3, 4, 5))
    layer, bottom, top, (y,) = run("Flatten", [x], **fields)
    assert y.shape == expected
    np.testing.assert_array_equal(y, x.reshape(expected))
    assert_shares(top[0], bottom[0])
    dy = rs.standard_normal(expected)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), dy.reshape(x.shape))


def test_flatten_gradient(rs):
    layer = make_layer("Flatten")
    bottom, top = setup(layer, [rs.standard_normal((2, 3, 2))])
    assert check_gradient(layer, bottom, top) > 0


def test_flatten_follows_bottom_reshape(rs):
    layer, bottom, top, _ = run("Flatten", [rs.standard_normal((2, 3, 2))])
    bottom[0].reshape((4, 3, 5))
    x = rs.standard_normal((4, 3, 5))
    bottom[0].set_data(x)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, x.reshape(4, 15))
    assert_shares(top[0], bottom[0])


def test_flatten_errors(rs):
    with pytest.raises(ConfigError, match="end_axis"):
        run("Flatten", [rs.standard_normal((2, 3, 4))], flatten_param={"axis": 2, "end_axis": 1})
    with pytest.raises(ConfigError, match="out of"):
        run("Flatten", [rs.standard_normal((2, 3))], flatten_param={"axis": 3})


# ---- Reshape ----------------------------------------------------------------------
@pytest.mark.parametrize("in_shape,reshape_param,expected", [
    ((2, 3, 4, 5), {"shape": {"dim": [0, -1]}}, (2, 60)),
    ((2, 3, 4, 5), {"shape": {"dim": [0, 2, -1, 0]}}, (2, 2, 6, 5)),
    ((2, 3, 4, 5), {"shape": {"dim": [6, 20]}}, (6, 20)),
    ((2, 6, 4), {"axis": 1, "num_axes": 1, "shape": {"dim": [3, -1]}}, (2, 3, 2, 4)),
    ((2, 3), {"axis": 0, "num_axes": 0, "shape": {"dim": [1]}}, (1, 2, 3)),
    ((2, 3), {"axis": -1, "num_axes": 0, "shape": {"dim": [1]}}, (2, 3, 1)),
    ((2, 3, 4), {"axis": 1, "shape": {"dim": [-1]}}, (2, 12)),
    ((2, 3, 4), {"axis": -2, "num_axes": 1, "shape": {"dim": [2, 2]}}, (2, 3, 2, 2)),
    ((2, 3, 4), {"axis": 1, "num_axes": 2, "shape": {"dim": [0, -1]}}, (2, 3, 4)),
])
def test_reshape(rs, in_shape, reshape_param, expected):
    x = rs.standard_normal(in_shape)
    layer, bottom, top, (y,) = run("Reshape", [x], reshape_param=reshape_param)
    assert y.shape == expected
    np.testing.assert_array_equal(y, x.reshape(expected))
    assert_shares(top[0], bottom[0])
    dy = rs.standard_normal(expected)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), dy.reshape(in_shape))


def test_reshape_gradient(rs):
    layer = make_layer("Reshape", reshape_param={"shape": {"dim": [-1, 3]}})
    bottom, top = setup(layer, [rs.standard_normal((2, 3, 2))])
    assert check_gradient(layer, bottom, top) > 0


def test_reshape_infers_again_after_bottom_reshape(rs):
    layer, bottom, top, _ = run("Reshape", [rs.standard_normal((2, 3, 2))],
                                reshape_param={"shape": {"dim": [-1, 3]}})
    assert top[0].shape == (4, 3)
    bottom[0].reshape((6, 3, 2))
    forward(layer, bottom, top)
    assert top[0].shape == (12, 3)


@pytest.mark.parametrize("reshape_param,match", [
    ({"shape": {"dim": [-1, -1]}}, "-1"),
    ({"shape": {"dim": [5, -1]}}, "divisible"),
    ({"shape": {"dim": [4, 7]}}, "count"),
    ({"shape": {"dim": [0, 0, 0, 0]}}, "no axis"),
    ({"shape": {"dim": [-2, 12]}}, "negative"),
    ({"axis": 2, "num_axes": 2, "shape": {"dim": [1]}}, "num_axes"),
    ({"axis": 4, "shape": {"dim": [1]}}, "out of range"),
    ({"num_axes": -2, "shape": {"dim": [1]}}, "num_axes"),
])
def test_reshape_errors(rs, reshape_param, match):
    with pytest.raises(ConfigError, match=match):
        run("Reshape", [rs.standard_normal((2, 3, 4))], reshape_param=reshape_param)


@pytest.mark.parametrize("type", ["Flatten", "Reshape"])
def test_not_in_place(type):
    b = Blob((3, 2), np.float64)
    with pytest.raises(ConfigError, match="in place"):
        make_layer(type).layer_setup([b], [b])


# ---- Silence ------------------------------------------------------------------------
def test_silence(rs):
    layer, bottom, top, outs = run("Silence", [rs.standard_normal((2, 3)), rs.standard_normal(4)],
                                   num_top=0)
    assert outs == []
    for b in bottom:
        b.set_diff(5.0)
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].cpu_diff().any()
    assert (bottom[1].cpu_diff() == 5.0).all()


def test_silence_gradient(rs):
    layer = make_layer("Silence")
    bottom, top = setup(layer, [rs.standard_normal((2, 3))], num_top=0)
    assert check_gradient(layer, bottom, top) > 0
