"""Tile: copies along an axis, numpy.tile semantics; backward sums the copies."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, run


def tile_ref(x, axis, tiles):
    shape = list(x.shape)
    shape[axis] *= tiles
    out = np.zeros(shape)
    d = x.shape[axis]
    for pos in np.ndindex(*shape):
        src = list(pos)
        src[axis] = pos[axis] % d
        out[pos] = x[tuple(src)]
    return out


@pytest.mark.parametrize("axis,tiles", [(1, 3), (0, 2), (-1, 2), (3, 1)])
def test_tile(axis, tiles):
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 4))
    layer, bottom, top, (y,) = run("Tile", [x], tile_param={"axis": axis, "tiles": tiles})
    np.testing.assert_array_equal(y, tile_ref(x, axis % 4, tiles))
    assert check_gradient(layer, bottom, top) > 0


def test_tile_default_axis_is_1():
    x = np.random.default_rng(0).standard_normal((2, 3))
    _, _, _, (y,) = run("Tile", [x], tile_param={"tiles": 2})
    np.testing.assert_array_equal(y, np.tile(x, (1, 2)))


@pytest.mark.parametrize("tile_param", [{}, {"tiles": 0}])
def test_tile_needs_positive_tiles(tile_param):
    with pytest.raises(ConfigError, match="tiles"):
        run("Tile", [np.zeros((2, 3))], tile_param=tile_param)
