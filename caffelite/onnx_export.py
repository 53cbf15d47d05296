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

This module builds the graph and drives the export; the per-layer converters are
``onnx_ops_shape`` (layers that change or combine shapes) and ``onnx_ops_pointwise``
(neurons and normalisations, which keep the bottom's shape).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import ConfigError
from .onnx_ops_pointwise import PointwiseOps
from .onnx_ops_shape import ShapeOps

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
class _Exporter(ShapeOps, PointwiseOps):
    """Walks the net in order and asks the converter of each layer type for its nodes."""

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

    def bottom_shape(self, i: int, k: int = 0) -> tuple:
        """The shape of layer ``i``'s bottom ``k``."""
        return self.shapes[self.net.bottom_ids[i][k]]

    def _axis(self, i, axis: int) -> int:
        """``axis`` of layer ``i``'s first bottom, counted from the front."""
        ndim = len(self.bottom_shape(i))
        return axis + ndim if axis < 0 else axis

    def _unary(self, op, i, layer, bottoms, tops, **attrs):
        return self.g.node(op, bottoms, self.out_name(i, tops[0]), layer.name, **attrs)

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
