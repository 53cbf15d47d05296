"""Export a deploy net to ONNX (opset 17), numerically equal to caffelite's forward pass.

    from caffelite.onnx_export import export_onnx
    export_onnx(net, "model.onnx")              # net: caffelite.Net / caffelite.net.Net

Inputs are the tops of the net's Input layers; outputs are the net's output
blobs, with their Caffe names. Shapes are the ones the net was built with
(``dynamic_batch=True`` leaves axis 0 free). Parameters are float32.

Layer by layer (Caffe semantics kept exactly):

- Convolution -> Conv, Deconvolution -> ConvTranspose (group, dilation, pad, N-d).
- Pooling MAX / AVE -> MaxPool / AveragePool where every window lies inside the
  padded image; Caffe's CEIL rounding can add windows that run past it (and AVE
  then divides by the window clipped to image + pad), so such layers become
  Pad + pool (+ a constant per-window correction for AVE). Global pooling ->
  GlobalMaxPool / GlobalAveragePool.
- InnerProduct -> Flatten(axis) + Gemm (+ Reshape when axis > 1).
- ReLU (LeakyRelu with negative_slope), PReLU, Sigmoid, TanH, ELU, AbsVal,
  BNLL (Softplus), Power, Exp, Log, Threshold, Clip, Swish; Dropout and Split
  are identities.
- LRN ACROSS_CHANNELS -> LRN (same alpha / n, k as bias); WITHIN_CHANNEL ->
  x * (1 + alpha * AvgPool(x^2))^-beta, as Caffe builds it.
- BatchNorm -> BatchNormalization with mean, var = blobs / scale factor;
  Scale / Bias -> Mul / Add with broadcast shapes; MVN -> ReduceMean, Sqrt, Div.
- Eltwise SUM (coefficients) / PROD / MAX, Concat, Slice (Split), Flatten,
  Reshape, Crop (Slice), Softmax (axis).

Anything else (data, loss and accuracy layers, Python layers, ...) stops the
export with a ConfigError naming the layer.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import ConfigError

OPSET = 17
IR_VERSION = 8  # the IR of opset 17; newer runtimes read it, older ones too

DATA_TYPES = {"Data", "HDF5Data", "ImageData", "MemoryData", "DummyData", "WindowData"}
_DEPLOY_HINT = "export a deploy net: an Input layer for the data, no loss or accuracy layers"


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package",
                          hint="pip install 'caffelite[onnx]' (or pip install onnx onnxruntime)") from None
    return onnx


def _core(net):
    """The caffelite.net.Net behind ``net`` (an api.Net or a core Net)."""
    from .net import Net  # noqa: PLC0415

    core = net if isinstance(net, Net) else getattr(net, "core", None)
    if not isinstance(core, Net):
        raise ConfigError(f"cannot export a {type(net).__name__}", hint="pass a built caffelite.Net")
    return core


def _named(exc: ConfigError, layer: str) -> ConfigError:
    """Record the layer on the error without a second "layer 'x':" prefix in its text."""
    exc.layer = layer
    return exc


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


# ---- the graph under construction -----------------------------------------------------------
class _Graph:
    def __init__(self, onnx, reserved: set[str]):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.used: set[str] = set()
        self.reserved = set(reserved)

    def fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.used or name in self.reserved:
            name, k = f"{hint}_{k}", k + 1
        self.used.add(name)
        return name

    def take(self, name: str) -> str:
        """Claim a reserved name (a blob's final version)."""
        self.reserved.discard(name)
        if name in self.used:
            return self.fresh(name)
        self.used.add(name)
        return name

    def const(self, hint: str, array, dtype=np.float32) -> str:
        name = self.fresh(hint)
        array = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, hint: str, values) -> str:
        return self.const(hint, np.asarray(values, dtype=np.int64), np.int64)

    def node(self, op: str, inputs, outputs, name: str, **attrs) -> list[str]:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(self.helper.make_node(op, list(inputs), outputs, name=self.fresh(name), **attrs))
        return outputs

    def temp(self, hint: str) -> str:
        return self.fresh(hint)


# ---- the exporter ----------------------------------------------------------------------------
class _Exporter:
    def __init__(self, net, dynamic_batch: bool):
        self.onnx = _onnx()
        self.net = _core(net)
        self.dynamic_batch = dynamic_batch
        net = self.net
        self.shapes = {name: tuple(blob.shape) for name, blob in net.blobs.items()}
        self.inputs = [top for layer, tops in zip(net.layers, net.top_ids) if layer.type == "Input"
                       for top in tops]
        self.last_writer = {}
        for i, tops in enumerate(net.top_ids):
            for top in tops:
                self.last_writer[top] = i
        self.g = _Graph(self.onnx, set(net.blobs))
        self.tensor: dict[str, str] = {}

    # ---- helpers ----------------------------------------------------------------------------
    def out_name(self, i: int, top: str) -> str:
        if self.last_writer[top] == i and top not in self.inputs:
            return self.g.take(top)
        return self.g.fresh(f"{top}/{self.net.layer_names[i]}")

    def value_info(self, name: str, shape):
        dims = list(shape)
        if self.dynamic_batch and dims:
            dims[0] = "N"
        return self.onnx.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, dims)

    def blob_array(self, layer, j: int) -> np.ndarray:
        return np.asarray(layer.blobs[j].cpu_data(), dtype=np.float32)

    def batch_shape(self, shape) -> list[int]:
        """A Reshape target: the static shape, with axis 0 inferred when the batch is free."""
        dims = [int(d) for d in shape]
        if self.dynamic_batch and dims:
            dims[0] = -1
        return dims

    # ---- driver -------------------------------------------------------------------------------
    def run(self, name: str, outputs=None):
        net, g = self.net, self.g
        for blob in self.inputs:
            self.tensor[blob] = g.take(blob)
            g.inputs.append(self.value_info(blob, self.shapes[blob]))
        for i, layer in enumerate(net.layers):
            lp = layer.layer_param
            if layer.type == "Input":
                continue
            handler = getattr(self, f"op_{layer.type}", None)
            if handler is None:
                hint = _DEPLOY_HINT if layer.type in DATA_TYPES or "Loss" in layer.type \
                    or layer.type in ("Accuracy", "Silence") else None
                raise _named(ConfigError(f"layer '{layer.name}' (type {layer.type}) cannot be exported "
                                         f"to ONNX", hint=hint), layer.name)
            bottoms = [self.tensor[b] for b in net.bottom_ids[i]]
            tops = net.top_ids[i]
            outs = handler(i, layer, lp, bottoms, tops)
            for top, tensor in zip(tops, outs):
                self.tensor[top] = tensor
        for blob in outputs if outputs is not None else net.output_blob_names:
            if blob not in self.tensor:
                from .errors import did_you_mean  # noqa: PLC0415

                raise ConfigError(f"no blob named '{blob}' to export", hint=did_you_mean(blob, self.tensor))
            if blob in self.inputs:
                continue
            tensor = self.tensor[blob]
            if tensor != blob:
                g.node("Identity", [tensor], [g.take(blob)], f"{blob}/output")
            g.outputs.append(self.value_info(blob, self.shapes[blob]))
        helper = self.onnx.helper
        graph = helper.make_graph(g.nodes, name or "caffelite", g.inputs, g.outputs, g.initializers)
        model = helper.make_model(graph, producer_name="caffelite",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        self.onnx.checker.check_model(model)
        return model

    def _error(self, layer, message: str, hint: str | None = None) -> ConfigError:
        return _named(ConfigError(f"layer '{layer.name}' (type {layer.type}) cannot be exported to "
                                  f"ONNX: {message}", hint=hint), layer.name)

    # ---- identities -------------------------------------------------------------------------
    def op_Split(self, i, layer, lp, bottoms, tops):
        return [bottoms[0]] * len(tops)

    def op_Dropout(self, i, layer, lp, bottoms, tops):
        return [bottoms[0]]  # TEST phase: y = x

    # ---- convolutions ---------------------------------------------------------------------
    def _conv(self, op, i, layer, lp, bottoms, tops):
        p = lp.convolution_param
        shape = self.shapes[self.net.bottom_ids[i][0]]
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
        in_shape = self.shapes[self.net.bottom_ids[i][0]]
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
        in_shape = self.shapes[self.net.bottom_ids[i][0]]
        axis = p.axis + len(in_shape) if p.axis < 0 else p.axis
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

    # ---- neurons -----------------------------------------------------------------------------
    def _unary(self, op, i, layer, bottoms, tops, **attrs):
        return self.g.node(op, bottoms, self.out_name(i, tops[0]), layer.name, **attrs)

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
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
        axis = lp.softmax_param.axis
        return self._unary("Softmax", i, layer, bottoms, tops, axis=axis + ndim if axis < 0 else axis)

    def op_PReLU(self, i, layer, lp, bottoms, tops):
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
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
        shape = self.shapes[self.net.bottom_ids[i][0]]
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

    def _operand(self, i, layer, axis_field, index_bottom, blob_index):
        """(tensor, is_learned) for Scale/Bias: the learned blob, or bottom 1 reshaped."""
        g = self.g
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
        if len(self.net.bottom_ids[i]) > 1:
            other = self.shapes[self.net.bottom_ids[i][1]]
            axis = 0 if not other else (axis_field + ndim if axis_field < 0 else axis_field)
            shape = list(other) + [1] * (ndim - axis - len(other))
            return g.node("Reshape", [index_bottom, g.ints(f"{layer.name}/operand_shape", shape)],
                          g.temp(f"{layer.name}/operand"), f"{layer.name}/operand")[0]
        array = self.blob_array(layer, blob_index)
        axis = 0 if array.ndim == 0 else (axis_field + ndim if axis_field < 0 else axis_field)
        return g.const(f"{layer.name}/{'scale' if layer.type == 'Scale' else 'bias'}",
                       self._broadcast(array, ndim, axis))

    def op_Scale(self, i, layer, lp, bottoms, tops):
        p, g = lp.scale_param, self.g
        two = len(bottoms) > 1
        scale = self._operand(i, layer, p.axis, bottoms[1] if two else None, 0)
        if not p.bias_term:
            return g.node("Mul", [bottoms[0], scale], self.out_name(i, tops[0]), layer.name)
        product = g.node("Mul", [bottoms[0], scale], g.temp(f"{layer.name}/product"), layer.name)[0]
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
        bias = self.blob_array(layer, 0 if two else 1)
        axis = 0 if bias.ndim == 0 else (p.axis + ndim if p.axis < 0 else p.axis)
        bias_name = g.const(f"{layer.name}/bias", self._broadcast(bias, ndim, axis))
        return g.node("Add", [product, bias_name], self.out_name(i, tops[0]), f"{layer.name}/bias")

    def op_Bias(self, i, layer, lp, bottoms, tops):
        p = lp.bias_param
        bias = self._operand(i, layer, p.axis, bottoms[1] if len(bottoms) > 1 else None, 0)
        return self.g.node("Add", [bottoms[0], bias], self.out_name(i, tops[0]), layer.name)

    def op_MVN(self, i, layer, lp, bottoms, tops):
        p, g = lp.mvn_param, self.g
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
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

    def _axis(self, i, axis: int) -> int:
        ndim = len(self.shapes[self.net.bottom_ids[i][0]])
        return axis + ndim if axis < 0 else axis

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
        in_shape = self.shapes[self.net.bottom_ids[i][0]]
        axis, end = self._axis(i, p.axis), self._axis(i, p.end_axis)
        if end == len(in_shape) - 1:
            return self._unary("Flatten", i, layer, bottoms, tops, axis=axis) if axis == 1 \
                else self._reshape(i, layer, bottoms, tops)
        return self._reshape(i, layer, bottoms, tops)

    def op_Reshape(self, i, layer, lp, bottoms, tops):
        return self._reshape(i, layer, bottoms, tops)

    def _reshape(self, i, layer, bottoms, tops):
        shape = self.batch_shape(self.shapes[tops[0]])
        in_shape = self.shapes[self.net.bottom_ids[i][0]]
        if self.dynamic_batch and (not in_shape or self.shapes[tops[0]][:1] != in_shape[:1]):
            shape = list(self.shapes[tops[0]])  # the batch axis is merged away: keep it static
        return self.g.node("Reshape", [bottoms[0], self.g.ints(f"{layer.name}/shape", shape)],
                           self.out_name(i, tops[0]), layer.name)

    def op_Crop(self, i, layer, lp, bottoms, tops):
        p, g = lp.crop_param, self.g
        in_shape = self.shapes[self.net.bottom_ids[i][0]]
        out_shape = self.shapes[tops[0]]
        axis = self._axis(i, p.axis)
        offsets = [int(v) for v in p.offset]
        axes = list(range(axis, len(in_shape)))
        starts = [0 if not offsets else offsets[0 if len(offsets) == 1 else k] for k in range(len(axes))]
        ends = [s + out_shape[a] for s, a in zip(starts, axes)]
        return g.node("Slice", [bottoms[0], g.ints(f"{layer.name}/starts", starts),
                                g.ints(f"{layer.name}/ends", ends), g.ints(f"{layer.name}/axes", axes)],
                      self.out_name(i, tops[0]), layer.name)


# ---- public API -----------------------------------------------------------------------------
def export_onnx(net, path: str | os.PathLike | None = None, *, dynamic_batch: bool = False,
                name: str | None = None, outputs=None):
    """The ONNX model (``onnx.ModelProto``) of a built deploy net; written atomically to
    ``path`` when given. ``outputs``: blob names to expose (default: the net's outputs; a
    blob rewritten in place gives its final value). Raises ConfigError naming the first
    layer ONNX cannot express."""
    exporter = _Exporter(net, dynamic_batch)
    model = exporter.run(name or exporter.net.name, outputs)
    if path is not None:
        from .io.atomic import write_bytes  # noqa: PLC0415

        write_bytes(path, model.SerializeToString())
    return model


def exportable_types() -> list[str]:
    """Layer types the exporter handles (Input included)."""
    return sorted(["Input"] + [n[3:] for n in dir(_Exporter) if n.startswith("op_")])


__all__ = ["export_onnx", "exportable_types", "OPSET"]
