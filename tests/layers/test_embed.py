"""Embed: table lookup forward, accumulated weight gradient, bias, bad indices."""
import numpy as np
import pytest

from caffelite.errors import ConfigError, DataError
from layer_testing import check_gradient, run

PARAM = {"num_output": 4, "input_dim": 6, "weight_filler": {"type": "gaussian"},
         "bias_filler": {"type": "gaussian"}}


def indices(shape=(3, 5), seed=0):
    # Repeats on purpose: the weight gradient must sum them.
    return np.random.default_rng(seed).integers(0, 6, shape).astype(float)


def embed_ref(x, weight, bias):
    out = np.zeros(x.shape + (weight.shape[1],))
    for pos in np.ndindex(*x.shape):
        out[pos] = weight[int(x[pos])] + (0 if bias is None else bias)
    return out


@pytest.mark.parametrize("bias_term", [True, False])
def test_embed(bias_term):
    x = indices()
    layer, bottom, top, (y,) = run("Embed", [x], embed_param={**PARAM, "bias_term": bias_term})
    assert [b.shape for b in layer.blobs] == [(6, 4)] + ([(4,)] if bias_term else [])
    weight = layer.blobs[0].cpu_data()
    bias = layer.blobs[1].cpu_data() if bias_term else None
    np.testing.assert_allclose(y, embed_ref(x, weight, bias), rtol=1e-12)
    assert check_gradient(layer, bottom, top, check_bottom=[]) > 0


def test_embed_weight_gradient_accumulates_repeated_indices():
    x = np.array([2.0, 0.0, 2.0, 2.0, 5.0])
    layer, bottom, top, _ = run("Embed", [x], embed_param=PARAM)
    dy = np.random.default_rng(1).standard_normal((5, 4))
    top[0].set_diff(dy)
    layer.blobs[0].set_diff(1.0)  # parameter diffs are added to
    layer.blobs[1].set_diff(0.0)
    bottom[0].set_diff(9.0)
    layer.backward(top, [False], bottom)
    want = np.ones((6, 4))
    for i, k in enumerate(x.astype(int)):
        want[k] += dy[i]
    np.testing.assert_allclose(layer.blobs[0].cpu_diff(), want, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].cpu_diff(), dy.sum(0), rtol=1e-12)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), 9.0)  # no gradient to the indices
    assert not layer.allow_force_backward(0)


@pytest.mark.parametrize("bad", [-1.0, 6.0, 1.5])
def test_embed_rejects_bad_indices(bad):
    x = indices()
    x[1, 2] = bad
    with pytest.raises(DataError, match="layer 'layer'.*integers in \\[0, 6\\)"):
        run("Embed", [x], embed_param=PARAM)


def test_embed_needs_sizes():
    with pytest.raises(ConfigError, match="num_output"):
        run("Embed", [indices()], embed_param={"input_dim": 6})
