"""Im2col: unrolled windows in Caffe's channel-major order; backward is col2im."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, run


def im2col_ref(x, kernel, stride, pad, dilation):
    """(N, C, H, W) -> (N, C*kh*kw, Ho, Wo), row c*kh*kw + i*kw + j."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    out = np.zeros((n, c * kh * kw, ho, wo))
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    row = (ch * kh + i) * kw + j
                    for oh in range(ho):
                        for ow in range(wo):
                            y, xx = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                            if 0 <= y < h and 0 <= xx < w:
                                out[b, row, oh, ow] = x[b, ch, y, xx]
    return out


CASES = [
    ({"kernel_size": [3]}, (3, 3), (1, 1), (0, 0), (1, 1)),
    ({"kernel_size": [3], "stride": [2], "pad": [1]}, (3, 3), (2, 2), (1, 1), (1, 1)),
    ({"kernel_h": 2, "kernel_w": 3, "stride_h": 1, "stride_w": 2, "pad_h": 1, "pad_w": 0},
     (2, 3), (1, 2), (1, 0), (1, 1)),
    ({"kernel_size": [2], "dilation": [2], "pad": [1]}, (2, 2), (1, 1), (1, 1), (2, 2)),
]


@pytest.mark.parametrize("param,kernel,stride,pad,dilation", CASES)
def test_im2col(param, kernel, stride, pad, dilation):
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6))
    layer, bottom, top, (y,) = run("Im2col", [x], convolution_param=param)
    want = im2col_ref(x, kernel, stride, pad, dilation)
    assert y.shape == want.shape
    np.testing.assert_array_equal(y, want)
    assert check_gradient(layer, bottom, top) > 0


def test_im2col_3d():
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 4, 4))
    _, _, _, (y,) = run("Im2col", [x], convolution_param={"kernel_size": [2, 1, 3], "pad": [0, 1, 1]})
    assert y.shape == (1, 2 * 6, 2, 6, 4)
    xp = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1), (1, 1)))
    # row (c, a, b, d) at output (z, u, v) = x_pad[c, z + a, u + b, v + d]
    np.testing.assert_array_equal(y[0, 1 * 6 + 0 * 3 + 2, 1, 3, 2], xp[0, 1, 1, 3, 4])
    np.testing.assert_array_equal(y[0, 0 * 6 + 1 * 3 + 0, 0, 5, 0], xp[0, 0, 1, 5, 0])


def test_im2col_needs_a_kernel():
    with pytest.raises(ConfigError, match="kernel_size"):
        run("Im2col", [np.zeros((1, 1, 4, 4))], convolution_param={})
