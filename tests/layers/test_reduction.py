"""Reduction: SUM / ASUM / SUMSQ / MEAN over the tail axes, with coeff."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, run

SHAPE = (2, 3, 4, 5)


def reduction_ref(x, op, axis, coeff):
    """Loop over the kept leading positions; reduce everything from ``axis`` on."""
    lead = x.shape[:axis]
    out = np.zeros(lead)
    for pos in np.ndindex(*lead):
        tail = x[pos].reshape(-1)
        value = {"SUM": tail.sum(), "ASUM": np.abs(tail).sum(), "SUMSQ": (tail * tail).sum(),
                 "MEAN": tail.sum() / tail.size}[op]
        out[pos] = coeff * value
    return out


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, 2.5), (2, -0.5), (-1, 1.0)])
def test_reduction(op, axis, coeff):
    x = np.random.default_rng(1).standard_normal(SHAPE)
    x[np.abs(x) < 1e-2] = 0.5  # keep ASUM off its kink
    layer, bottom, top, (y,) = run("Reduction", [x], reduction_param={"operation": op, "axis": axis,
                                                                      "coeff": coeff})
    canonical = axis % x.ndim
    assert y.shape == SHAPE[:canonical]
    np.testing.assert_allclose(y, reduction_ref(x, op, canonical, coeff), rtol=1e-12, atol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_reduction_defaults_sum_everything():
    x = np.arange(6.0).reshape(2, 3)
    _, _, _, (y,) = run("Reduction", [x])
    assert y.shape == () and y == 15.0


def test_reduction_axis_out_of_range():
    with pytest.raises(ConfigError, match="axis 4"):
        run("Reduction", [np.zeros(SHAPE)], reduction_param={"axis": 4})
