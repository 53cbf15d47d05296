"""Convolution and Deconvolution (``convolution_param``), im2col + one GEMM per group.

Bottom (N, C, *S) with channel axis ``axis`` (axes before it are flattened
into N), ``group`` G, kernel K, stride s, pad p, dilation d per spatial axis::

    Convolution    top (N, M, *So),  So = floor((S + 2p - (d(K-1)+1)) / s) + 1
                   weight (M, C/G, *K), bias (M,)
                   top_g = W_g @ im2col(x)_g + b             (one GEMM per group)
                   dW_g += dtop_g @ col_g^T ;  dx = col2im(W_g^T @ dtop_g)
    Deconvolution  top (N, M, *So),  So = s(S - 1) + d(K-1) + 1 - 2p
                   weight (C, M/G, *K), bias (M,)
                   the transpose: forward = Convolution's data gradient,
                   dx = Convolution's forward without bias, dW from the same GEMM.

Every GEMM covers the whole batch (in chunks only when the column buffer would
pass ``im2col.MAX_COL_ELEMENTS``). The columns and every other work buffer are
scratch from the arena all layers share (im2col.ARENA, as Caffe's one column
buffer): backward builds the columns again instead of keeping them from
forward (on a GPU, where CuPy's pool serves the buffers, a single chunk's columns
are kept for the weight gradient as before). A 1x1 kernel with stride 1 and no
pad skips im2col: the blob already is the column matrix, so forward and the data
gradient are one matmul per item straight on the blobs. Several bottoms share
the weights, one top each. ``engine`` CUDNN runs this same code for now.

On the CPU a Convolution may run another engine instead, picked per layer by a
measured rule: conv_dft.py (small DFTs as GEMMs: fewer FLOPs for 5x5 kernels with
many channels, stride 1), conv_direct.py (compiled vector kernels straight on the
padded image, no columns: stride-1 float32 layers with large maps, as a first
layer), conv_columns.py (compiled im2col in cache-sized chunks,
GEMMs per item backward: 2-D layers with outputs of 256 pixels or more) or,
without the compiled kernels, conv_flat.py (stride 1, im2col on the padded
image's flat rows: cheap NumPy copies for the first layer's few channels).
"""
from __future__ import annotations

import math

from ..fillers import fill
from ..registry import register_layer
from . import conv_columns, conv_dft, conv_direct, conv_flat, im2col
from .base import Layer, check_not_in_place
from .im2col import ARENA, Columns, Geometry

#: None picks per layer (the DFT engine where it saves enough FLOPs, else the direct
#: engine, the columns engine, or the flat one without compiled kernels, where it pays,
#: else im2col + GEMM); "gemm", "dft", "direct", "columns" or "flat" force one (tests,
#: benchmarks). "dft" only applies to 2-D Convolution with stride 1 and dilation 1,
#: "direct" to what conv_direct.available allows, "columns" to 2-D Convolution where
#: the compiled kernels are built, "flat" to stride 1.
FORCE_ENGINE: str | None = None


def _spatial_values(layer: Layer, name: str, num_axes: int, default: int) -> tuple:
    """Read a repeated ``name`` field or its ``name_h``/``name_w`` form, Caffe's rules."""
    p = layer.param
    repeated = list(getattr(p, name)) if name != "kernel" else list(p.kernel_size)
    field = "kernel_size" if name == "kernel" else name
    if p.HasField(f"{name}_h") or p.HasField(f"{name}_w"):
        if num_axes != 2:
            raise layer.error(f"{name}_h & {name}_w can only be used for 2-D convolution, "
                              f"this bottom has {num_axes} spatial axes", hint=f"use '{field}'")
        if repeated:
            raise layer.error(f"either {field} or {name}_h/{name}_w should be given, not both",
                              hint=f"remove '{field}' or the _h/_w fields")
        return (int(getattr(p, f"{name}_h")), int(getattr(p, f"{name}_w")))
    if len(repeated) not in (0, 1, num_axes) or (not repeated and default is None):
        raise layer.error(f"{field} must be given once, or once per spatial axis "
                          f"({len(repeated)} given, {num_axes} spatial axes)",
                          hint=f"e.g. {field}: 3" if not repeated else f"give 1 or {num_axes} values")
    if not repeated:
        return (default,) * num_axes
    return tuple(int(v) for v in (repeated * num_axes if len(repeated) == 1 else repeated))


class _ConvolutionBase(Layer):
    num_bottom = (1, None)
    num_top = (1, None)
    param_name = "convolution_param"
    deconvolution = False

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        if len(bottom) != len(top):
            raise self.error(f"needs one top per bottom, got {len(bottom)} bottoms and {len(top)} tops",
                             hint="list as many tops as bottoms")
        p = self.param
        self.axis = bottom[0].canonical_axis(p.axis)
        axes = bottom[0].num_axes - self.axis - 1
        if axes < 1:
            raise self.error(f"needs at least one spatial axis after axis {self.axis}, "
                             f"bottom is {bottom[0].shape}", hint="check 'axis' and the bottom's shape")
        kernel = _spatial_values(self, "kernel", axes, None)
        if any(k <= 0 for k in kernel):
            raise self.error(f"kernel dimensions must be nonzero, got {kernel}",
                             hint="set kernel_size (or kernel_h and kernel_w) to positive values")
        stride = _spatial_values(self, "stride", axes, 1)
        if any(s <= 0 for s in stride):
            raise self.error(f"stride dimensions must be nonzero, got {stride}",
                             hint="give both stride_h and stride_w, or 'stride'")
        pad = _spatial_values(self, "pad", axes, 0)
        dilation = list(p.dilation)
        if len(dilation) not in (0, 1, axes):
            raise self.error(f"dilation must be given once, or once per spatial axis "
                             f"({len(dilation)} given, {axes} spatial axes)", hint="give 1 value")
        dilation = tuple(int(v) for v in (dilation * axes if len(dilation) == 1 else dilation)) or (1,) * axes
        if any(d <= 0 for d in dilation):
            raise self.error(f"dilation must be positive, got {dilation}", hint="use dilation: 1")
        self.geometry = Geometry(kernel, stride, pad, dilation)
        self.columns = Columns(self.geometry)

        self.channels = bottom[0].shape[self.axis]
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if self.num_output <= 0:
            raise self.error("num_output must be set to a positive number",
                             hint="add convolution_param { num_output: ... }")
        if self.group <= 0:
            raise self.error(f"group must be positive, got {self.group}", hint="use group: 1")
        if self.channels % self.group:
            raise self.error(f"the bottom's {self.channels} channels are not divisible by group {self.group}",
                             hint="pick a group that divides the input channels")
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} is not a multiple of group {self.group}",
                             hint="pick a group that divides num_output")
        self.bias_term = p.bias_term
        if self.deconvolution:
            shape = (self.channels, self.num_output // self.group) + kernel
        else:
            shape = (self.num_output, self.channels // self.group) + kernel
        self.blobs = [self.make_blob(shape, f"{self.name}_w")]
        fill(self.blobs[0], p.weight_filler, self.rng)
        if self.bias_term:
            self.blobs.append(self.make_blob((self.num_output,), f"{self.name}_b"))
            fill(self.blobs[1], p.bias_filler, self.rng)
        self._col_ready = False

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.error(f"all bottoms must have the same shape: {shape} vs {b.shape}",
                                 hint="use one layer per input shape")
        if len(shape) != self.axis + 1 + len(self.geometry.kernel):
            raise self.error(f"the bottom {shape} changed its number of axes since set-up",
                             hint="keep the input's number of axes")
        if shape[self.axis] != self.channels:
            raise self.error(f"input size incompatible with convolution kernel: the bottom has "
                             f"{shape[self.axis]} channels, the weights were made for {self.channels}",
                             hint="the number of input channels cannot change after set-up")
        self.num = math.prod(shape[:self.axis])
        self.in_spatial = tuple(shape[self.axis + 1:])
        g = self.geometry
        out = g.deconv_out(self.in_spatial) if self.deconvolution else g.conv_out(self.in_spatial)
        if any(o <= 0 for o in out):
            raise self.error(
                f"output size {out} is not positive for input {self.in_spatial} with kernel "
                f"{g.kernel}, stride {g.stride}, pad {g.pad}, dilation {g.dilation}",
                hint="the input is too small: reduce kernel_size/dilation or add pad")
        self.out_spatial = out
        for t in top:
            t.reshape(shape[:self.axis] + (self.num_output,) + out)
        # The column side is the smaller (conv top / deconv bottom) spatial shape.
        col_spatial = self.in_spatial if self.deconvolution else out
        col_channels = self.num_output if self.deconvolution else self.channels
        self.chunks = self.columns.plan(self.xp, self.num, col_channels * g.kernel_count, col_spatial)
        self._col_ready = False
        # One engine at most, the first that takes this geometry (None: im2col + GEMM).
        self.dft = self._dft_engine()
        self.direct = self._direct_engine() if self.dft is None else None
        self.compiled = self._columns_engine() if self.dft is self.direct is None else None
        self.flat = (self._flat_engine() if self.dft is self.direct is self.compiled is None
                     else None)

    def _dft_engine(self):
        """The DFT engine for this geometry, or None for im2col + GEMM (see conv_dft.py)."""
        g = self.geometry
        # float16 overflows the transform's sums, and on a GPU cuDNN / GEMM are the fast paths.
        if self.dtype.itemsize < 4 or self.device.is_gpu:
            return None
        if (self.deconvolution or FORCE_ENGINE not in (None, "dft") or len(g.kernel) != 2
                or any(s != 1 for s in g.stride) or any(d != 1 for d in g.dilation)
                or g.kernel == (1, 1)):
            return None
        args = (self.num, self.channels, self.num_output, self.group, self.in_spatial)
        if FORCE_ENGINE != "dft" and not conv_dft.worth_it(*args, g.kernel, self.out_spatial, g.pad):
            return None
        return self._kept("dft", args + (g.pad, self.dtype),
                          lambda: conv_dft.DFTConvolution(self.xp, self.dtype, *args, g.kernel, g.pad))

    def _kept(self, attr: str, key: tuple, make):
        """The engine in ``attr`` if it was made for ``key``, else a new one from ``make()``."""
        engine = getattr(self, attr, None)
        if engine is None or engine.key != key:
            engine = make()
            engine.key = key
        return engine

    def _direct_engine(self):
        """The direct engine for this geometry, or None (see conv_direct.py)."""
        g = self.geometry
        if (self.deconvolution or self.device.is_gpu or FORCE_ENGINE not in (None, "direct")
                or im2col.FORCE_LAYOUT is not None
                or not conv_direct.available(self.dtype, g, self.group)):
            return None
        if FORCE_ENGINE != "direct" and not conv_direct.worth_it(self.in_spatial, g):
            return None
        key = (self.num, self.channels, self.num_output, self.in_spatial, g)
        return self._kept("direct", key, lambda: conv_direct.DirectConvolution(*key))

    def _columns_engine(self):
        """The columns engine for this geometry, or None (see conv_columns.py)."""
        g = self.geometry
        if (self.deconvolution or self.device.is_gpu or FORCE_ENGINE not in (None, "columns")
                or im2col.FORCE_LAYOUT is not None or not conv_columns.available(self.dtype, g)
                or (all(k == 1 for k in g.kernel) and all(s == 1 for s in g.stride)
                    and not any(g.pad))):   # (pointwise: the image is its own column matrix)
            return None
        if FORCE_ENGINE != "columns" and not conv_columns.worth_it(self.out_spatial):
            return None
        key = (self.num, self.channels, self.num_output, self.group, self.in_spatial, self.dtype,
               self.bias_term, g)
        return self._kept("compiled", key, lambda: conv_columns.ColumnsConvolution(
            self.dtype, *key[:5], g, self.bias_term))

    def _flat_engine(self):
        """The flat engine for this geometry, or None (see conv_flat.py)."""
        g = self.geometry
        if (self.deconvolution or self.device.is_gpu or FORCE_ENGINE not in (None, "flat")
                or im2col.FORCE_LAYOUT is not None or any(s != 1 for s in g.stride)
                or (all(k == 1 for k in g.kernel) and not any(g.pad))):
            return None
        if FORCE_ENGINE != "flat" and not conv_flat.worth_it(self.channels, self.group,
                                                              self.in_spatial, g):
            return None
        key = (self.num, self.channels, self.num_output, self.group, self.in_spatial, self.dtype,
               self.bias_term)
        return self._kept("flat", key, lambda: conv_flat.FlatConvolution(
            self.xp, self.dtype, *key[:5], g, self.bias_term))

    @property
    def cpu_engine(self):
        """The DFT, direct, columns or flat engine this layer runs, or None for the strided im2col
        + GEMM."""
        return next((e for e in (self.dft, self.direct, self.compiled, self.flat) if e is not None),
                    None)

    @property
    def pointwise(self) -> bool:
        """1x1 kernel, stride 1, no pad, batch-first pixels: the image is its own column matrix."""
        g = self.geometry
        return (all(k == 1 for k in g.kernel) and all(s == 1 for s in g.stride)
                and not any(g.pad) and not self.columns.pixels.batch_last)

    # ---- shapes as seen by the GEMMs ---------------------------------------
    def _images(self, blob, channels, spatial, diff=False):
        return (blob.diff if diff else blob.data).reshape((self.num, channels) + spatial)

    def _per_group(self, images):
        """(n, C, *S) -> (n, G, C/G, prod(S)) for per-item GEMMs."""
        return images.reshape(images.shape[0], self.group, images.shape[1] // self.group, -1)

    def _weight(self):
        """Weight as (G, rows, cols): conv (G, M/G, C/G*K), deconv (G, C/G, M/G*K)."""
        w = self.blobs[0].data
        return w.reshape(self.group, w.shape[0] // self.group, -1)

    def _grouped(self, mat):
        return mat.reshape(self.group, mat.shape[0] // self.group, -1)

    def _gemm(self, a, b, out=None):
        """(G, m, k) @ (G, k, n); a plain 2-D GEMM when G == 1 (NumPy's stacked path is slower)."""
        if a.shape[2] == 1:
            # An outer product (depthwise column gradient): broadcasting beats matmul's loop.
            return self.xp.multiply(a, b, out=out)
        if a.shape[0] == 1:
            return self.xp.matmul(a[0], b[0], out=None if out is None else out[0])[None]
        return self.xp.matmul(a, b, out=out)

    def _add_weight_grad(self, a, b) -> None:
        """dW += a_g @ b_g^T for (rows, P) pixel matrices a and b."""
        grad = self._gemm(self._grouped(a), self._grouped(b).swapaxes(1, 2))
        self.blobs[0].add_to_diff(grad.reshape(self.blobs[0].shape))

    def _bias(self):
        return self.blobs[1].data if self.bias_term else None

    def _add_bias(self, images) -> None:
        if self.bias_term:
            images += self.blobs[1].data.reshape((-1,) + (1,) * (images.ndim - 2))


@register_layer("Convolution")
class ConvolutionLayer(_ConvolutionBase):
    """Caffe's Convolution: weight (M, C/G, *K), bias (M,)."""

    def forward(self, bottom, top):
        with ARENA.scope():   # the scratch buffers (im2col.Scratch) live for this call
            self._forward(bottom, top)

    def _forward(self, bottom, top):
        xp, cols = self.xp, self.columns
        engine = self.cpu_engine
        if engine is not None:
            for b, t in zip(bottom, top):
                engine.forward(self._images(b, self.channels, self.in_spatial), self.blobs[0].data,
                               self._bias(), self._images(t, self.num_output, self.out_spatial))
            # With several bottoms the kept input spectrum is the last one's.
            engine.x_ready = engine.x_ready and len(bottom) == 1
            return
        w = self._weight()
        for b, t in zip(bottom, top):
            x = self._images(b, self.channels, self.in_spatial)
            y = self._images(t, self.num_output, self.out_spatial)
            if self.pointwise:
                xp.matmul(w, self._per_group(x), out=self._per_group(y))
                self._add_bias(y)
                continue
            for n0, n1 in self.chunks:
                col = cols.im2col(xp, x[n0:n1], self.out_spatial)
                out = cols.buffer(xp, "gemm", (self.num_output, col.shape[1]), col.dtype)
                self._gemm(w, self._grouped(col), out=self._grouped(out))
                cols.from_pixels(xp, out, y[n0:n1], self._bias())
        # On a GPU (buffers not from the arena) with one bottom and one chunk the 'col' buffer
        # still holds these columns when backward runs, so the weight gradient reuses them.
        self._col_ready = (self.device.is_gpu and len(bottom) == 1 and len(self.chunks) == 1
                           and not self.pointwise)

    def backward(self, top, propagate_down, bottom):
        with ARENA.scope():   # the scratch buffers (im2col.Scratch) live for this call
            self._backward(top, propagate_down, bottom)

    def _backward(self, top, propagate_down, bottom):
        xp, cols = self.xp, self.columns
        need_w = self.param_propagate_down[0]
        need_b = self.bias_term and self.param_propagate_down[1]
        engine = self.cpu_engine
        if engine is not None:
            for i, (b, t) in enumerate(zip(bottom, top)):
                if need_w or need_b or propagate_down[i]:
                    engine.backward(self._images(b, self.channels, self.in_spatial), self.blobs[0].data,
                                    self._images(t, self.num_output, self.out_spatial, diff=True),
                                    self._images(b, self.channels, self.in_spatial, diff=True)
                                    if propagate_down[i] else None,
                                    self.blobs[0] if need_w else None, self.blobs[1] if need_b else None)
            return
        w = self._weight()
        for i, (b, t) in enumerate(zip(bottom, top)):
            need_x = propagate_down[i]
            x = self._images(b, self.channels, self.in_spatial)
            dy = self._images(t, self.num_output, self.out_spatial, diff=True)
            if need_x and self.pointwise:
                dx = self._images(b, self.channels, self.in_spatial, diff=True)
                xp.matmul(w.swapaxes(1, 2), self._per_group(dy), out=self._per_group(dx))
                need_x = False
            if not (need_w or need_b or need_x):
                continue
            dx = self._images(b, self.channels, self.in_spatial, diff=True) if need_x else None
            for n0, n1 in self.chunks:
                dyp = cols.to_pixels(xp, dy[n0:n1], "dy")
                if need_b:
                    self.blobs[1].add_to_diff(dyp.sum(axis=1))
                if need_w:
                    if self.pointwise:
                        col = cols.to_pixels(xp, x[n0:n1], "x")
                    elif self._col_ready:
                        col, _ = cols.column_buffer(xp, n1 - n0, self.channels, self.out_spatial, dyp.dtype)
                    else:   # (on the CPU always: the columns are scratch, not kept from forward)
                        col = cols.im2col(xp, x[n0:n1], self.out_spatial)
                    self._add_weight_grad(dyp, col)
                if need_x:
                    # The column gradient reuses the 'col' buffer: the columns are spent.
                    dcol, _ = cols.column_buffer(xp, n1 - n0, self.channels, self.out_spatial, dyp.dtype)
                    self._col_ready = False
                    self._gemm(w.swapaxes(1, 2), self._grouped(dyp), out=self._grouped(dcol))
                    cols.col2im(xp, dcol, dx[n0:n1])


@register_layer("Deconvolution")
class DeconvolutionLayer(_ConvolutionBase):
    """Caffe's Deconvolution (transposed convolution): weight (C, M/G, *K), bias (M,)."""

    deconvolution = True

    def forward(self, bottom, top):
        with ARENA.scope():   # the scratch buffers (im2col.Scratch) live for this call
            self._forward(bottom, top)

    def _forward(self, bottom, top):
        xp, cols = self.xp, self.columns  # (no DFT engine: _dft_engine declines deconvolutions)
        w = self._weight()
        for b, t in zip(bottom, top):
            x = self._images(b, self.channels, self.in_spatial)
            y = self._images(t, self.num_output, self.out_spatial)
            if self.pointwise:
                xp.matmul(w.swapaxes(1, 2), self._per_group(x), out=self._per_group(y))
                self._add_bias(y)
                continue
            for n0, n1 in self.chunks:
                xpix = cols.to_pixels(xp, x[n0:n1], "x")
                col, _ = cols.column_buffer(xp, n1 - n0, self.num_output, self.in_spatial, x.dtype)
                self._gemm(w.swapaxes(1, 2), self._grouped(xpix), out=self._grouped(col))
                cols.col2im(xp, col, y[n0:n1], self._bias())

    def backward(self, top, propagate_down, bottom):
        with ARENA.scope():   # the scratch buffers (im2col.Scratch) live for this call
            self._backward(top, propagate_down, bottom)

    def _backward(self, top, propagate_down, bottom):
        xp, cols = self.xp, self.columns
        need_w = self.param_propagate_down[0]
        w = self._weight()
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self._images(t, self.num_output, self.out_spatial, diff=True)
            if self.bias_term and self.param_propagate_down[1]:
                self.blobs[1].diff += dy.reshape(self.num, self.num_output, -1).sum(axis=(0, 2))
            need_x = propagate_down[i]
            x = self._images(b, self.channels, self.in_spatial)
            if need_x and self.pointwise:
                dx = self._images(b, self.channels, self.in_spatial, diff=True)
                xp.matmul(w, self._per_group(dy), out=self._per_group(dx))
                need_x = False
            if not (need_w or need_x):
                continue
            dx = self._images(b, self.channels, self.in_spatial, diff=True) if need_x else None
            for n0, n1 in self.chunks:
                if self.pointwise:
                    col = cols.to_pixels(xp, dy[n0:n1], "dy")
                else:
                    col = cols.im2col(xp, dy[n0:n1], self.in_spatial)
                if need_w:
                    self._add_weight_grad(cols.to_pixels(xp, x[n0:n1], "x"), col)
                if need_x:
                    out = cols.buffer(xp, "gemm", (self.channels, col.shape[1]), col.dtype)
                    self._gemm(w, self._grouped(col), out=self._grouped(out))
                    cols.from_pixels(xp, out, dx[n0:n1])
