"""The compiled CPU kernels (cpu_kernels.c) against plain loops: element types, strided
outputs, plane ranges, padding. (The Pooling tests run the layer on them too.)"""
import os
import subprocess
import sys

import numpy as np
import pytest

from caffelite.layers import cpu_kernels, im2col
from caffelite.layers.im2col import ARENA, Columns, Geometry

def test_the_library_is_built():
    assert cpu_kernels.LIB is not None, "the CPU kernels are not built: pip install -e ."


def out_size(size, k, s, p):
    value = -(-(size + 2 * p - k) // s) + 1
    return value - 1 if p and (value - 1) * s >= size + p else value


def max_backward_ref(dy, index, shape, k, s, p):
    """Caffe's backward loop: each output's gradient to its argmax offset (dropped where that
    lies in the padding)."""
    planes, height, width = shape
    dx = np.zeros(shape)
    for n in range(planes):
        for oh in range(dy.shape[1]):
            for ow in range(dy.shape[2]):
                at = int(index[n, oh, ow])
                h, w = oh * s[0] - p[0] + at // k[1], ow * s[1] - p[1] + at % k[1]
                if 0 <= h < height and 0 <= w < width:
                    dx[n, h, w] += dy[n, oh, ow]
    return dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_type", [np.uint8, np.int32])
@pytest.mark.parametrize("shape,k,s,p", [((5, 8, 8), (2, 2), (2, 2), (0, 0)),
                                         ((4, 9, 7), (3, 3), (2, 2), (1, 1)),
                                         ((3, 7, 10), (3, 2), (1, 3), (1, 0)),
                                         ((2, 6, 6), (4, 4), (3, 3), (2, 2))])
def test_max_backward_matches_caffes_loop(dtype, index_type, shape, k, s, p):
    rng = np.random.default_rng(3)
    out = (out_size(shape[1], k[0], s[0], p[0]), out_size(shape[2], k[1], s[1], p[1]))
    # The outputs as strided views, as the layer hands them over: a crop of a larger grid
    # (phased work) and a batch-last buffer.
    grid = rng.standard_normal((shape[0], out[0] + 1, out[1] + 2)).astype(dtype)
    dy = grid[:, :out[0], :out[1]]
    index = np.ascontiguousarray(
        rng.integers(0, k[0] * k[1], (out[0], out[1], shape[0])).astype(index_type)).transpose(2, 0, 1)
    dx = np.full(shape, np.nan, dtype)   # (every element is written)
    geom = cpu_kernels.geometry(shape[1:], out, k, s, p)
    cpu_kernels.max_backward(dy, index, dx, (0, shape[0]), geom)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(dx, max_backward_ref(dy, index, shape, k, s, p), rtol=tol, atol=tol)


def test_only_the_given_planes_are_written():
    shape, k, s = (6, 6, 6), (2, 2), (2, 2)
    dy = np.ones((6, 3, 3), np.float32)
    index = np.full((6, 3, 3), 3, np.uint8)
    dx = np.full(shape, -7.0, np.float32)
    geom = cpu_kernels.geometry(shape[1:], (3, 3), k, s, (0, 0))
    cpu_kernels.max_backward(dy, index, dx, (2, 4), geom)
    assert (dx[:2] == -7).all() and (dx[4:] == -7).all()
    np.testing.assert_allclose(dx[2:4].sum(axis=(1, 2)), 9.0)


def test_a_strided_input_gradient_is_refused():
    dx = np.zeros((2, 4, 8), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.max_backward(np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), dx,
                                 (0, 2), cpu_kernels.geometry((4, 4), (2, 2), (2, 2), (2, 2), (0, 0)))


def test_max_backward_checks_its_arrays():
    geom = cpu_kernels.geometry((4, 4), (2, 2), (2, 2), (2, 2), (0, 0))
    dy, index = np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8)
    dx = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="do not fit"):   # planes past the batch
        cpu_kernels.max_backward(dy, index, dx, (0, 3), geom)
    with pytest.raises(ValueError, match="do not fit"):   # an index of another shape
        cpu_kernels.max_backward(dy, index[:, :1], dx, (0, 2), geom)
    with pytest.raises(ValueError, match="do not fit"):   # dy of another element type
        cpu_kernels.max_backward(dy.astype(np.float64), index, dx, (0, 2), geom)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_handles_what_the_library_has(dtype):
    assert cpu_kernels.handles(np.zeros(1, dtype), np.zeros(1, np.uint8))
    assert not cpu_kernels.handles(np.zeros(1, np.float16))


def test_environment_turns_the_library_off():
    code = "from caffelite.layers import cpu_kernels; print(cpu_kernels.LIB is None)"
    env = dict(os.environ, CAFFELITE_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


GEOMETRIES = [((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 5), (1, 1), (2, 2), (1, 1)),
              ((3, 2), (2, 3), (0, 1), (1, 1)), ((3, 3), (1, 2), (2, 0), (2, 1)),
              ((2, 2), (3, 3), (3, 3), (1, 1))]   # (the last: windows wholly in the padding)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["rows first", "items first"])
@pytest.mark.parametrize("kernel,stride,pad,dilation", GEOMETRIES)
def test_im2col_matches_numpy_and_col2im_is_its_adjoint(dtype, layout, kernel, stride, pad, dilation,
                                                        monkeypatch):
    monkeypatch.setattr(im2col, "FORCE_LAYOUT", "batch_first")
    g = Geometry(kernel, stride, pad, dilation)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 7, 8)).astype(dtype)
    out = g.conv_out(x.shape[2:])
    rows, pixels = 2 * g.kernel_count, int(np.prod(out))
    columns = Columns(g)
    columns.plan(np, 3, rows, out)
    with ARENA.scope():
        want = columns.im2col(np, x, out).copy()   # (rows, n * pixels), NumPy's strided slices
    shape = cpu_kernels.conv_shape(2, x.shape[2:], out, g)
    strides = (pixels, 3 * pixels) if layout == "rows first" else (rows * pixels, pixels)
    col = np.full(rows * 3 * pixels, np.nan, dtype)
    cpu_kernels.im2col(x, col, (0, 3), strides, shape)
    got = col.reshape(rows, 3 * pixels) if layout == "rows first" else \
        col.reshape(3, rows, pixels).transpose(1, 0, 2).reshape(rows, -1)
    np.testing.assert_array_equal(got, want)
    # <im2col(x), c> == <x, col2im(c)> for every c: col2im is the adjoint.
    c = rng.standard_normal(col.shape).astype(dtype)
    back = np.full(x.shape, np.nan, dtype)
    cpu_kernels.col2im(c, back, (0, 3), strides, shape)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(np.dot(col, c), np.vdot(x, back), rtol=tol)


def test_columns_kernels_check_their_buffers():
    g = Geometry((3, 3), (1, 1), (1, 1), (1, 1))
    x = np.zeros((2, 2, 5, 5), np.float32)
    shape = cpu_kernels.conv_shape(2, (5, 5), (5, 5), g)
    with pytest.raises(ValueError, match="do not fit"):   # one item's columns short
        cpu_kernels.im2col(x, np.zeros(18 * 25 * 2 - 1, np.float32), (0, 2), (25, 50), shape)
    with pytest.raises(ValueError, match="do not fit"):   # items past the batch
        cpu_kernels.col2im(np.zeros(18 * 25 * 3, np.float32), x, (0, 3), (25, 75), shape)
    with pytest.raises(ValueError, match="do not fit"):   # another element type
        cpu_kernels.im2col(x, np.zeros(18 * 25 * 2), (0, 2), (25, 50), shape)


def test_momentum_update_refuses_mismatched_arrays():
    w, h = np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="one size and element type"):
        cpu_kernels.momentum_update("sgd", 0.9, 0.1, 0.0, w, h, np.zeros(4))
    with pytest.raises(ValueError, match="one size and element type"):
        cpu_kernels.momentum_update("sgd", 0.9, 0.1, 0.0, w, h, np.zeros(3, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("conj", [False, True])
def test_complex_combine_matches_the_numpy_passes(dtype, conj):
    """The DFT engine's complex products from their real parts, into one group's columns of a
    wider output, bit for bit as conv_dft.py's NumPy passes (other columns untouched)."""
    rs = np.random.default_rng(5)
    cols, width, column = 3, 8, 4
    z = rs.standard_normal((4, 2, 5, 6, 2 * cols)).astype(dtype)
    out = rs.standard_normal((4, 2, 5, 6, width)).astype(dtype)
    before = out.copy()
    cpu_kernels.complex_combine(z, out, column, conj)
    (a_re, a_im), (b_re, b_im) = ((z[:, i, ..., :cols], z[:, i, ..., cols:]) for i in (0, 1))
    expected = (a_re + b_im, b_re - a_im) if conj else (a_re - b_im, a_im + b_re)
    np.testing.assert_array_equal(out[:, 0, ..., column:column + cols], expected[0])
    np.testing.assert_array_equal(out[:, 1, ..., column:column + cols], expected[1])
    np.testing.assert_array_equal(np.delete(out, np.s_[column:column + cols], axis=-1),
                                  np.delete(before, np.s_[column:column + cols], axis=-1))
    with pytest.raises(ValueError, match="complex_combine"):
        cpu_kernels.complex_combine(z, out, width - 1, conj)   # past the output's columns
