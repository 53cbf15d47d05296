"""BatchReindex and Filter: item selection forward, scatter backward, no index gradient."""
import numpy as np
import pytest

from caffelite.errors import ConfigError, DataError
from caffelite.layers.selection import scatter_add_rows
from layer_testing import check_gradient, run


def data(shape=(5, 2, 3), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ---- BatchReindex ------------------------------------------------------------
@pytest.mark.parametrize("index", [[2, 0, 2, 4, 2, 1], [4, 3, 2, 1, 0], [3]])
def test_batch_reindex(index):
    x = data()
    layer, bottom, top, (y,) = run("BatchReindex", [x, np.array(index, float)])
    want = np.stack([x[i] for i in index])
    np.testing.assert_array_equal(y, want)
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_batch_reindex_backward_sums_repeats_and_skips_indices():
    x = data()
    index = np.array([2.0, 0.0, 2.0, 2.0])
    layer, bottom, top, _ = run("BatchReindex", [x, index])
    dy = data((4, 2, 3), seed=1)
    top[0].set_diff(dy)
    bottom[1].set_diff(5.0)
    layer.backward(top, [True, False], bottom)
    want = np.zeros_like(x)
    for i, k in enumerate(index.astype(int)):
        want[k] += dy[i]
    np.testing.assert_allclose(bottom[0].cpu_diff(), want, rtol=1e-12)
    np.testing.assert_array_equal(bottom[1].cpu_diff(), 5.0)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


@pytest.mark.parametrize("bad", [-1.0, 5.0, 0.5])
def test_batch_reindex_rejects_bad_indices(bad):
    with pytest.raises(DataError, match="layer 'layer'"):
        run("BatchReindex", [data(), np.array([0.0, bad])])


def test_batch_reindex_indices_must_be_a_vector():
    with pytest.raises(ConfigError, match="vector"):
        run("BatchReindex", [data(), np.zeros((2, 1))])


def test_scatter_add_rows_matches_add_at():
    rng = np.random.default_rng(2)
    index = rng.integers(0, 7, 50)
    rows = rng.standard_normal((50, 3))
    out = rng.standard_normal((7, 3))
    want = out.copy()
    np.add.at(want, index, rows)
    scatter_add_rows(np, out, index, rows)
    np.testing.assert_allclose(out, want, rtol=1e-12)


# ---- Filter ------------------------------------------------------------------
@pytest.mark.parametrize("selector", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
def test_filter(selector):
    a, b = data(), data((5, 4), seed=1)
    sel = np.array(selector, float).reshape(5, 1, 1, 1)
    layer, bottom, top, (ya, yb) = run("Filter", [a, b, sel], num_top=2)
    keep = [i for i, s in enumerate(selector) if s]
    np.testing.assert_array_equal(ya, np.stack([a[i] for i in keep]))
    np.testing.assert_array_equal(yb, np.stack([b[i] for i in keep]))
    assert check_gradient(layer, bottom, top, check_bottom=[0, 1]) > 0


def test_filter_backward_zeroes_dropped_items_and_not_the_selector():
    a = data()
    sel = np.array([0.0, 2.0, 0.0, -1.0, 0.0])  # any nonzero value keeps the item
    layer, bottom, top, (y,) = run("Filter", [a, sel])
    assert y.shape == (2, 2, 3)
    dy = data((2, 2, 3), seed=3)
    top[0].set_diff(dy)
    bottom[1].set_diff(4.0)
    layer.backward(top, [True, False], bottom)
    want = np.zeros_like(a)
    want[[1, 3]] = dy
    np.testing.assert_array_equal(bottom[0].cpu_diff(), want)
    np.testing.assert_array_equal(bottom[1].cpu_diff(), 4.0)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_filter_checks():
    with pytest.raises(ConfigError, match="one top per filtered bottom"):
        run("Filter", [data(), np.ones(5)], num_top=2)
    with pytest.raises(ConfigError, match="selector"):
        run("Filter", [data(), np.ones((5, 2))])
    with pytest.raises(ConfigError, match="items"):
        run("Filter", [data(), np.ones(4)])
