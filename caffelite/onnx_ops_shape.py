"""ONNX converters for the Caffe layers that change or combine shapes: Convolution,
Deconvolution, Pooling, InnerProduct, Eltwise, Concat, Slice, Split, Flatten, Reshape and
Crop (Dropout too, an identity at test time), with Caffe's convolution and pooling geometry.
``caffelite.onnx_export`` drives them; its docstring lists how each layer maps to ONNX.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError


# ---- Caffe geometry --------------------------------------------------------------------
def _per_axis(values, n: int, default: int, name: str, layer) -> list[int]:
    values = [int(v) for v in values]
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} values for {n} spatial axes", layer=layer)
    return values


def conv_geometry(p, n: int, layer: str):
    """(kernel, stride, pad, dilation) per spatial axis, as Caffe's BaseConvolutionLayer reads them."""
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        kernel = [int(p.kernel_h), int(p.kernel_w)]
    else:
        kernel = _per_axis(p.kernel_size, n, 0, "kernel_size", layer)
    stride = [int(p.stride_h), int(p.stride_w)] if p.HasField("stride_h") or p.HasField("stride_w") \
        else _per_axis(p.stride, n, 1, "stride", layer)
    pad = [int(p.pad_h), int(p.pad_w)] if p.HasField("pad_h") or p.HasField("pad_w") \
        else _per_axis(p.pad, n, 0, "pad", layer)
    dilation = _per_axis(p.dilation, n, 1, "dilation", layer)
    return kernel, stride, pad, dilation


def pool_geometry(p):
    kernel = [int(p.kernel_h), int(p.kernel_w)] if p.HasField("kernel_h") else [int(p.kernel_size)] * 2
    stride = [int(p.stride_h), int(p.stride_w)] if p.HasField("stride_h") else [int(p.stride)] * 2
    pad = [int(p.pad_h), int(p.pad_w)] if p.HasField("pad_h") else [int(p.pad)] * 2
    return kernel, stride, pad


def ave_divisors(size: int, out: int, k: int, s: int, p: int) -> np.ndarray:
    """Caffe's AVE divisor per output position of one axis: the window clipped to image + pad."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    return (end - start).astype(np.float64)


class ShapeOps:
    """``op_<Type>(i, layer, lp, bottoms, tops)`` returns the ONNX tensor names of the layer's
    tops. Mixed into ``onnx_export._Exporter``, which provides ``g`` (the graph), ``net``,
    ``shapes``, ``out_name``, ``blob_array``, ``batch_shape``, ``bottom_shape``, ``_axis``,
    ``_unary`` and ``_error``."""

    # ---- identities -------------------------------------------------------------------------
    def op_Split(self, i, layer, lp, bottoms, tops):
        return [bottoms[0]] * len(tops)

    def op_Dropout(self, i, layer, lp, bottoms, tops):
        return [bottoms[0]]  # TEST phase: y = x

    # ---- convolutions ---------------------------------------------------------------------
    def _conv(self, op, i, layer, lp, bottoms, tops):
        p = lp.convolution_param
        shape = self.bottom_shape(i)
        if layer.layer_param.convolution_param.axis not in (1, 1 - len(shape)):
            raise self._error(layer, "only axis 1 (channels) is supported")
        if len(bottoms) != 1:
            raise self._error(layer, "only one bottom is supported", hint="one layer per bottom")
        n = len(shape) - 2
        kernel, stride, pad, dilation = conv_geometry(p, n, layer.name)
        inputs = [bottoms[0], self.g.const(f"{layer.name}/W", self.blob_array(layer, 0))]
        if p.bias_term:
            inputs.append(self.g.const(f"{layer.name}/b", self.blob_array(layer, 1)))
        out = self.out_name(i, tops[0])
        return self.g.node(op, inputs, out, layer.name, kernel_shape=kernel, strides=stride,
                           pads=pad + pad, dilations=dilation, group=int(p.group))

    def op_Convolution(self, i, layer, lp, bottoms, tops):
        return self._conv("Conv", i, layer, lp, bottoms, tops)

    def op_Deconvolution(self, i, layer, lp, bottoms, tops):
        return self._conv("ConvTranspose", i, layer, lp, bottoms, tops)

    # ---- pooling ---------------------------------------------------------------------------
    def op_Pooling(self, i, layer, lp, bottoms, tops):
        p, g = lp.pooling_param, self.g
        if p.pool not in (0, 1):
            raise self._error(layer, "only MAX and AVE pooling have an ONNX form",
                              hint="STOCHASTIC pooling has none")
        in_shape = self.bottom_shape(i)
        out_shape = self.shapes[tops[0]]
        if len(in_shape) != 4:
            raise self._error(layer, f"expected an N x C x H x W bottom, got {in_shape}")
        is_max = p.pool == 0
        out = self.out_name(i, tops[0])
        if p.global_pooling:
            return g.node("GlobalMaxPool" if is_max else "GlobalAveragePool", bottoms, out, layer.name)
        kernel, stride, pad = pool_geometry(p)
        size, pooled = in_shape[2:], out_shape[2:]
        floor_out = [(h + 2 * q - k) // s + 1 for h, q, k, s in zip(size, pad, kernel, stride)]
        if list(pooled) == floor_out:
            # Every window ends inside image + pad: ONNX's floor mode, with pad counted for AVE,
            # is Caffe's computation.
            attrs = dict(kernel_shape=kernel, strides=stride, pads=pad + pad)
            if not is_max:
                attrs["count_include_pad"] = 1
            return g.node("MaxPool" if is_max else "AveragePool", bottoms, out, layer.name, **attrs)
        # CEIL rounding added windows past the padded image: pad explicitly so they fit. (With
        # pad < kernel, as Caffe requires, the windows then tile the padded input exactly.)
        ends = [(o - 1) * s + k - h - q for o, s, k, h, q in zip(pooled, stride, kernel, size, pad)]
        if min(ends) < 0:
            raise self._error(layer, f"unexpected pooling geometry (pad {pad}, kernel {kernel})")
        pads = [0, 0, pad[0], pad[1], 0, 0, ends[0], ends[1]]
        fill = -np.inf if is_max else 0.0
        padded = g.node("Pad", [bottoms[0], g.ints(f"{layer.name}/pads", pads),
                                g.const(f"{layer.name}/pad_value", np.asarray(fill))],
                        g.temp(f"{layer.name}/padded"), f"{layer.name}/pad")[0]
        if is_max:  # padding never wins a max: every window holds a pixel of the image
            return g.node("MaxPool", [padded], out, layer.name, kernel_shape=kernel, strides=stride)
        pooled_sum = g.node("AveragePool", [padded], g.temp(f"{layer.name}/pooled"), layer.name,
                            kernel_shape=kernel, strides=stride)[0]
        # AveragePool divided by k_h * k_w; Caffe divides by the window clipped to image + pad.
        rows = ave_divisors(size[0], pooled[0], kernel[0], stride[0], pad[0])
        cols = ave_divisors(size[1], pooled[1], kernel[1], stride[1], pad[1])
        factor = (kernel[0] * kernel[1]) / np.outer(rows, cols)
        return g.node("Mul", [pooled_sum, g.const(f"{layer.name}/divisor", factor[None, None])], out,
                      f"{layer.name}/divide")

    # ---- inner product -------------------------------------------------------------------------
    def op_InnerProduct(self, i, layer, lp, bottoms, tops):
        p, g = lp.inner_product_param, self.g
        in_shape = self.bottom_shape(i)
        axis = self._axis(i, p.axis)
        out_shape = self.shapes[tops[0]]
        flat = g.node("Flatten", bottoms, g.temp(f"{layer.name}/flat"), f"{layer.name}/flatten",
                      axis=axis)[0] if len(in_shape) != 2 or axis != 1 else bottoms[0]
        inputs = [flat, g.const(f"{layer.name}/W", self.blob_array(layer, 0))]
        if p.bias_term:
            inputs.append(g.const(f"{layer.name}/b", self.blob_array(layer, 1)))
        out = self.out_name(i, tops[0])
        gemm_out = out if axis == 1 else g.temp(f"{layer.name}/gemm")
        g.node("Gemm", inputs, gemm_out, layer.name, transB=0 if p.transpose else 1)
        if axis != 1:
            g.node("Reshape", [gemm_out, g.ints(f"{layer.name}/shape", self.batch_shape(out_shape))],
                   out, f"{layer.name}/reshape")
        return [out]

    # ---- combining and shaping ---------------------------------------------------------------
    def op_Eltwise(self, i, layer, lp, bottoms, tops):
        p, g = lp.eltwise_param, self.g
        out = self.out_name(i, tops[0])
        if p.operation == 0:  # PROD
            return self._chain("Mul", layer, bottoms, out)
        if p.operation == 2:  # MAX
            return g.node("Max", bottoms, out, layer.name)
        coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottoms)
        if len(coeffs) != len(bottoms):
            raise self._error(layer, f"{len(coeffs)} coefficients for {len(bottoms)} bottoms")
        terms = []
        for k, (x, c) in enumerate(zip(bottoms, coeffs)):
            if c != 1.0:
                x = g.node("Mul", [x, g.const(f"{layer.name}/coeff{k}", np.float32(c))],
                           g.temp(f"{layer.name}/term{k}"), f"{layer.name}/coeff{k}")[0]
            terms.append(x)
        return g.node("Sum", terms, out, layer.name)

    def _chain(self, op, layer, inputs, out):
        g = self.g
        acc = inputs[0]
        for k, x in enumerate(inputs[1:], 1):
            target = out if k == len(inputs) - 1 else g.temp(f"{layer.name}/{op.lower()}{k}")
            acc = g.node(op, [acc, x], target, layer.name)[0]
        return [acc]

    def op_Concat(self, i, layer, lp, bottoms, tops):
        p = lp.concat_param
        axis = p.concat_dim if p.HasField("concat_dim") else p.axis
        return self.g.node("Concat", bottoms, self.out_name(i, tops[0]), layer.name,
                           axis=self._axis(i, axis))

    def op_Slice(self, i, layer, lp, bottoms, tops):
        p, g = lp.slice_param, self.g
        axis = self._axis(i, p.slice_dim if p.HasField("slice_dim") else p.axis)
        sizes = [self.shapes[t][axis] for t in tops]
        outs = [self.out_name(i, t) for t in tops]
        return g.node("Split", [bottoms[0], g.ints(f"{layer.name}/split", sizes)], outs, layer.name,
                      axis=axis)

    def op_Flatten(self, i, layer, lp, bottoms, tops):
        p = lp.flatten_param
        in_shape = self.bottom_shape(i)
        axis, end = self._axis(i, p.axis), self._axis(i, p.end_axis)
        if end == len(in_shape) - 1:
            return self._unary("Flatten", i, layer, bottoms, tops, axis=axis) if axis == 1 \
                else self._reshape(i, layer, bottoms, tops)
        return self._reshape(i, layer, bottoms, tops)

    def op_Reshape(self, i, layer, lp, bottoms, tops):
        return self._reshape(i, layer, bottoms, tops)

    def _reshape(self, i, layer, bottoms, tops):
        shape = self.batch_shape(self.shapes[tops[0]])
        in_shape = self.bottom_shape(i)
        if self.dynamic_batch and (not in_shape or self.shapes[tops[0]][:1] != in_shape[:1]):
            shape = list(self.shapes[tops[0]])  # the batch axis is merged away: keep it static
        return self.g.node("Reshape", [bottoms[0], self.g.ints(f"{layer.name}/shape", shape)],
                           self.out_name(i, tops[0]), layer.name)

    def op_Crop(self, i, layer, lp, bottoms, tops):
        p, g = lp.crop_param, self.g
        in_shape = self.bottom_shape(i)
        out_shape = self.shapes[tops[0]]
        axis = self._axis(i, p.axis)
        offsets = [int(v) for v in p.offset]
        axes = list(range(axis, len(in_shape)))
        starts = [0 if not offsets else offsets[0 if len(offsets) == 1 else k] for k in range(len(axes))]
        ends = [s + out_shape[a] for s, a in zip(starts, axes)]
        return g.node("Slice", [bottoms[0], g.ints(f"{layer.name}/starts", starts),
                                g.ints(f"{layer.name}/ends", ends), g.ints(f"{layer.name}/axes", axes)],
                      self.out_name(i, tops[0]), layer.name)
