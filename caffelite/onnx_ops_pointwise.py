"""ONNX converters for the Caffe layers that keep their bottom's shape: the neurons (ReLU,
PReLU, Sigmoid, TanH, ELU, AbsVal, BNLL, Power, Exp, Log, Threshold, Clip, Swish, Softmax)
and the normalisations (LRN, BatchNorm, Scale, Bias, MVN). ``caffelite.onnx_export`` drives
them; its docstring lists how each layer maps to ONNX.
"""
from __future__ import annotations

import math

import numpy as np


class PointwiseOps:
    """The shape-keeping converters, mixed into ``onnx_export._Exporter`` on the terms that
    ``onnx_ops_shape.ShapeOps`` describes."""

    # ---- neurons -----------------------------------------------------------------------------
    def op_ReLU(self, i, layer, lp, bottoms, tops):
        slope = float(lp.relu_param.negative_slope)
        if slope:
            return self._unary("LeakyRelu", i, layer, bottoms, tops, alpha=slope)
        return self._unary("Relu", i, layer, bottoms, tops)

    def op_Sigmoid(self, i, layer, lp, bottoms, tops):
        return self._unary("Sigmoid", i, layer, bottoms, tops)

    def op_TanH(self, i, layer, lp, bottoms, tops):
        return self._unary("Tanh", i, layer, bottoms, tops)

    def op_AbsVal(self, i, layer, lp, bottoms, tops):
        return self._unary("Abs", i, layer, bottoms, tops)

    def op_BNLL(self, i, layer, lp, bottoms, tops):
        return self._unary("Softplus", i, layer, bottoms, tops)

    def op_ELU(self, i, layer, lp, bottoms, tops):
        return self._unary("Elu", i, layer, bottoms, tops, alpha=float(lp.elu_param.alpha))

    def op_Softmax(self, i, layer, lp, bottoms, tops):
        return self._unary("Softmax", i, layer, bottoms, tops, axis=self._axis(i, lp.softmax_param.axis))

    def op_PReLU(self, i, layer, lp, bottoms, tops):
        ndim = len(self.bottom_shape(i))
        slope = self.blob_array(layer, 0)
        slope = slope.reshape((1,)) if slope.size == 1 and lp.prelu_param.channel_shared \
            else slope.reshape((-1,) + (1,) * (ndim - 2))
        return self.g.node("PRelu", [bottoms[0], self.g.const(f"{layer.name}/slope", slope)],
                           self.out_name(i, tops[0]), layer.name)

    def _affine(self, layer, x: str, scale: float, shift: float) -> str:
        """shift + scale * x, skipping the identity parts."""
        g = self.g
        if scale != 1.0:
            x = g.node("Mul", [x, g.const(f"{layer.name}/scale", np.float32(scale))],
                       g.temp(f"{layer.name}/scaled"), f"{layer.name}/scale")[0]
        if shift != 0.0:
            x = g.node("Add", [x, g.const(f"{layer.name}/shift", np.float32(shift))],
                       g.temp(f"{layer.name}/shifted"), f"{layer.name}/shift")[0]
        return x

    def _finish(self, i, layer, tops, tensor: str, bottoms) -> list[str]:
        """Give ``tensor`` the layer's output name (an Identity only when nothing was computed)."""
        out = self.out_name(i, tops[0])
        if tensor == bottoms[0]:
            return self.g.node("Identity", [tensor], out, layer.name)
        self.g.nodes[-1].output[0] = out
        return [out]

    def op_Power(self, i, layer, lp, bottoms, tops):
        p = lp.power_param
        x = self._affine(layer, bottoms[0], float(p.scale), float(p.shift))
        if float(p.power) != 1.0:
            x = self.g.node("Pow", [x, self.g.const(f"{layer.name}/power", np.float32(p.power))],
                            self.g.temp(f"{layer.name}/pow"), layer.name)[0]
        return self._finish(i, layer, tops, x, bottoms)

    def op_Exp(self, i, layer, lp, bottoms, tops):
        p = lp.exp_param
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        x = self._affine(layer, bottoms[0], float(p.scale) * log_base, float(p.shift) * log_base)
        return self.g.node("Exp", [x], self.out_name(i, tops[0]), layer.name)

    def op_Log(self, i, layer, lp, bottoms, tops):
        p = lp.log_param
        x = self._affine(layer, bottoms[0], float(p.scale), float(p.shift))
        if p.base == -1:
            return self.g.node("Log", [x], self.out_name(i, tops[0]), layer.name)
        x = self.g.node("Log", [x], self.g.temp(f"{layer.name}/ln"), layer.name)[0]
        return self.g.node("Mul", [x, self.g.const(f"{layer.name}/inv_log_base",
                                                   np.float32(1.0 / math.log(p.base)))],
                           self.out_name(i, tops[0]), f"{layer.name}/base")

    def op_Threshold(self, i, layer, lp, bottoms, tops):
        g = self.g
        above = g.node("Greater", [bottoms[0], g.const(f"{layer.name}/threshold",
                                                       np.float32(lp.threshold_param.threshold))],
                       g.temp(f"{layer.name}/above"), layer.name)[0]
        return g.node("Cast", [above], self.out_name(i, tops[0]), f"{layer.name}/cast",
                      to=self.onnx.TensorProto.FLOAT)

    def op_Clip(self, i, layer, lp, bottoms, tops):
        g, p = self.g, lp.clip_param
        return g.node("Clip", [bottoms[0], g.const(f"{layer.name}/min", np.float32(p.min)),
                               g.const(f"{layer.name}/max", np.float32(p.max))],
                      self.out_name(i, tops[0]), layer.name)

    def op_Swish(self, i, layer, lp, bottoms, tops):
        g = self.g
        x = self._affine(layer, bottoms[0], float(lp.swish_param.beta), 0.0)
        gate = g.node("Sigmoid", [x], g.temp(f"{layer.name}/gate"), layer.name)[0]
        return g.node("Mul", [bottoms[0], gate], self.out_name(i, tops[0]), f"{layer.name}/mul")

    # ---- normalisation ---------------------------------------------------------------------
    def op_LRN(self, i, layer, lp, bottoms, tops):
        p, g = lp.lrn_param, self.g
        size, alpha, beta = int(p.local_size), float(p.alpha), float(p.beta)
        if p.norm_region == 0:  # ACROSS_CHANNELS: ONNX's LRN also divides alpha by size
            return self._unary("LRN", i, layer, bottoms, tops, size=size, alpha=alpha, beta=beta,
                               bias=float(p.k))
        pre = (size - 1) // 2
        x = bottoms[0]
        square = g.node("Mul", [x, x], g.temp(f"{layer.name}/square"), f"{layer.name}/square")[0]
        mean = g.node("AveragePool", [square], g.temp(f"{layer.name}/mean"), f"{layer.name}/pool",
                      kernel_shape=[size, size], strides=[1, 1], pads=[pre] * 4, count_include_pad=1)[0]
        scale = self._affine(layer, mean, alpha, 1.0)
        power = g.node("Pow", [scale, g.const(f"{layer.name}/beta", np.float32(-beta))],
                       g.temp(f"{layer.name}/power"), f"{layer.name}/power")[0]
        return g.node("Mul", [x, power], self.out_name(i, tops[0]), layer.name)

    def op_BatchNorm(self, i, layer, lp, bottoms, tops):
        p = lp.batch_norm_param
        if p.HasField("use_global_stats") and not p.use_global_stats:
            raise self._error(layer, "use_global_stats: false normalises with batch statistics",
                              hint="remove use_global_stats for deployment")
        shape = self.bottom_shape(i)
        if len(shape) < 2:
            raise self._error(layer, f"needs an N x C x ... bottom, got {shape}")
        factor = float(self.blob_array(layer, 2).ravel()[0])
        factor = 0.0 if factor == 0 else 1.0 / factor
        mean = self.blob_array(layer, 0) * np.float32(factor)
        var = self.blob_array(layer, 1) * np.float32(factor)
        g = self.g
        channels = mean.size
        inputs = [bottoms[0], g.const(f"{layer.name}/gamma", np.ones(channels)),
                  g.const(f"{layer.name}/beta", np.zeros(channels)),
                  g.const(f"{layer.name}/mean", mean), g.const(f"{layer.name}/var", var)]
        return g.node("BatchNormalization", inputs, self.out_name(i, tops[0]), layer.name,
                      epsilon=float(p.eps))

    def _broadcast(self, array: np.ndarray, ndim: int, axis: int) -> np.ndarray:
        """An operand of bottom dims axis.. reshaped to broadcast against the whole bottom."""
        trailing = ndim - axis - array.ndim
        return array.reshape(array.shape + (1,) * trailing)

    def _learned(self, i, layer, array: np.ndarray, axis_field: int, label: str) -> str:
        """A learned Scale/Bias blob as a constant that broadcasts against the whole bottom."""
        axis = 0 if array.ndim == 0 else self._axis(i, axis_field)
        return self.g.const(f"{layer.name}/{label}", self._broadcast(array, len(self.bottom_shape(i)), axis))

    def _operand(self, i, layer, axis_field, index_bottom, blob_index):
        """The operand of Scale/Bias: the learned blob, or bottom 1 reshaped to broadcast."""
        g = self.g
        if len(self.net.bottom_ids[i]) > 1:
            ndim, other = len(self.bottom_shape(i)), self.bottom_shape(i, 1)
            axis = 0 if not other else self._axis(i, axis_field)
            shape = list(other) + [1] * (ndim - axis - len(other))
            return g.node("Reshape", [index_bottom, g.ints(f"{layer.name}/operand_shape", shape)],
                          g.temp(f"{layer.name}/operand"), f"{layer.name}/operand")[0]
        return self._learned(i, layer, self.blob_array(layer, blob_index), axis_field,
                             "scale" if layer.type == "Scale" else "bias")

    def op_Scale(self, i, layer, lp, bottoms, tops):
        p, g = lp.scale_param, self.g
        two = len(bottoms) > 1
        scale = self._operand(i, layer, p.axis, bottoms[1] if two else None, 0)
        if not p.bias_term:
            return g.node("Mul", [bottoms[0], scale], self.out_name(i, tops[0]), layer.name)
        product = g.node("Mul", [bottoms[0], scale], g.temp(f"{layer.name}/product"), layer.name)[0]
        bias_name = self._learned(i, layer, self.blob_array(layer, 0 if two else 1), p.axis, "bias")
        return g.node("Add", [product, bias_name], self.out_name(i, tops[0]), f"{layer.name}/bias")

    def op_Bias(self, i, layer, lp, bottoms, tops):
        p = lp.bias_param
        bias = self._operand(i, layer, p.axis, bottoms[1] if len(bottoms) > 1 else None, 0)
        return self.g.node("Add", [bottoms[0], bias], self.out_name(i, tops[0]), layer.name)

    def op_MVN(self, i, layer, lp, bottoms, tops):
        p, g = lp.mvn_param, self.g
        ndim = len(self.bottom_shape(i))
        axes = list(range(1 if p.across_channels else 2, ndim))
        if not axes:
            raise self._error(layer, "needs spatial axes (or across_channels: true)")
        x = bottoms[0]
        mean = g.node("ReduceMean", [x], g.temp(f"{layer.name}/mean"), f"{layer.name}/mean",
                      axes=axes, keepdims=1)[0]
        if not p.normalize_variance:
            return g.node("Sub", [x, mean], self.out_name(i, tops[0]), layer.name)
        z = g.node("Sub", [x, mean], g.temp(f"{layer.name}/centered"), layer.name)[0]
        square = g.node("Mul", [z, z], g.temp(f"{layer.name}/square"), f"{layer.name}/square")[0]
        var = g.node("ReduceMean", [square], g.temp(f"{layer.name}/var"), f"{layer.name}/var",
                     axes=axes, keepdims=1)[0]
        std = g.node("Sqrt", [var], g.temp(f"{layer.name}/std"), f"{layer.name}/std")[0]
        std = g.node("Add", [std, g.const(f"{layer.name}/eps", np.float32(p.eps))],
                     g.temp(f"{layer.name}/std_eps"), f"{layer.name}/eps")[0]
        return g.node("Div", [z, std], self.out_name(i, tops[0]), f"{layer.name}/divide")
