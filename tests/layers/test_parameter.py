"""Parameter: a learned blob as the top, zero-initialised; backward adds into its diff."""
import numpy as np

from layer_testing import check_gradient, make_layer, setup, forward


def parameter_layer(shape=(2, 3)):
    layer = make_layer("Parameter", parameter_param={"shape": {"dim": list(shape)}})
    bottom, top = setup(layer, [])
    return layer, bottom, top


def test_parameter_top_is_the_blob():
    layer, bottom, top = parameter_layer()
    assert [b.shape for b in layer.blobs] == [(2, 3)]
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, np.zeros((2, 3)))  # Caffe: no filler, zeros
    values = np.arange(6.0).reshape(2, 3)
    layer.blobs[0].set_data(values)  # e.g. loaded weights or a solver update
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, values)


def test_parameter_gradient():
    layer, bottom, top = parameter_layer((3, 2, 2))
    layer.blobs[0].set_data(np.random.default_rng(0).standard_normal((3, 2, 2)))
    assert check_gradient(layer, bottom, top) > 0


def test_parameter_backward_accumulates():
    layer, bottom, top = parameter_layer()
    forward(layer, bottom, top)
    layer.blobs[0].set_diff(1.0)
    top[0].set_diff(np.full((2, 3), 2.0))
    layer.backward(top, [], bottom)
    layer.backward(top, [], bottom)
    np.testing.assert_array_equal(layer.blobs[0].cpu_diff(), 5.0)
