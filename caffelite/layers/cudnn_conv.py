"""Convolution on the GPU through cuDNN (``engine: CUDNN``), by NVIDIA's cuDNN frontend.

CuPy 14 dropped its cuDNN bindings, so this engine uses the frontend's Python graph API
(package ``nvidia-cudnn-frontend``, import name ``cudnn``; the optional extra ``cudnn``):
one graph per operation and shape, built once and cached::

    forward          y  = conv_fprop(image=x, weight=W)            (+ b per channel, in xp)
    data gradient    dx = conv_dgrad(loss=dy, filter=W)            (overwrites bottom diff)
    weight gradient  dW += conv_wgrad(image=x, loss=dy)            (written in place when the
                                                                    diff is pending zeros)
    bias gradient    db += sum of dy over N and space              (in xp)

Shapes are Caffe's NCHW (or NCDHW), contiguous; groups come from the weight's shape
(M, C/G, *K). Data types float32 (TF32 tensor cores unless ``allow_tf32: false``), float16
and bfloat16, accumulating in float32.

Which engine runs a Convolution layer (see ``registry.layer_class``):

- ``engine: CAFFE``: always the im2col + GEMM layer (convolution.py);
- ``engine: CUDNN`` or ``DEFAULT`` on a GPU with cuDNN importable: this layer;
- on the CPU, or without cuDNN: the im2col layer, after ONE warning per process (on the CPU
  only when CUDNN was asked for explicitly: DEFAULT there means CAFFE, silently).

A geometry cuDNN refuses (plan build fails) falls back to the im2col path for that layer.
On the CPU this module changes nothing.
"""
from __future__ import annotations

import logging

import numpy as np

from ..backend import tf32_enabled
from ..registry import register_engine
from .convolution import ConvolutionLayer

log = logging.getLogger(__name__)

_warned: set[str] = set()
_cudnn = None
_cudnn_error: str | None = None
_handles: dict[int, object] = {}
_plans: dict[tuple, "_Plan"] = {}


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", message)


def cudnn_module():
    """The cuDNN frontend module, or None when it cannot be imported (the reason is kept)."""
    global _cudnn, _cudnn_error
    if _cudnn is None and _cudnn_error is None:
        try:
            import cudnn  # noqa: PLC0415 - optional, GPU only

            _cudnn = cudnn
        except Exception as exc:  # ImportError, or a missing libcudnn at import
            _cudnn_error = f"{type(exc).__name__}: {exc}"
    return _cudnn


def cudnn_version() -> str | None:
    """The cuDNN backend version, e.g. '9.5.0', or None."""
    cudnn = cudnn_module()
    if cudnn is None:
        return None
    try:
        return str(cudnn.backend_version_string())
    except Exception:
        try:
            v = int(cudnn.backend_version())
            return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else str(v)
        except Exception:
            return "unknown"


def _handle(device_id: int, xp):
    handle = _handles.get(device_id)
    if handle is None:
        with xp.cuda.Device(device_id):
            handle = _handles[device_id] = _cudnn.create_handle()
    return handle


def _c_strides(shape) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(int(d), 1)
    return strides[::-1]


def _data_type(dtype: np.dtype):
    dt = _cudnn.data_type
    if dtype == np.float32:
        return dt.FLOAT
    if dtype == np.float16:
        return dt.HALF
    if dtype.name == "bfloat16":
        return dt.BFLOAT16
    return None


class _Plan:
    """One built cuDNN graph (fprop, dgrad or wgrad) for fixed shapes, dtype and geometry."""

    def __init__(self, handle, kind: str, x_shape, w_shape, y_shape, dtype, geometry, tf32: bool):
        cudnn = _cudnn
        io = _data_type(dtype)
        graph = cudnn.pygraph(handle=handle, io_data_type=io,
                              intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT)
        conv = dict(padding=list(geometry.pad), stride=list(geometry.stride),
                    dilation=list(geometry.dilation))

        def tensor(name, shape):
            return graph.tensor(name=name, dim=list(shape), stride=_c_strides(shape), data_type=io)

        if kind == "fprop":
            x, w = tensor("x", x_shape), tensor("w", w_shape)
            out = graph.conv_fprop(image=x, weight=w, **conv)
            out_shape, self.inputs = y_shape, {"x": x, "w": w}
        elif kind == "dgrad":
            dy, w = tensor("dy", y_shape), tensor("w", w_shape)
            out = graph.conv_dgrad(loss=dy, filter=w, **conv)
            out_shape, self.inputs = x_shape, {"dy": dy, "w": w}
        else:
            x, dy = tensor("x", x_shape), tensor("dy", y_shape)
            out = graph.conv_wgrad(image=x, loss=dy, **conv)
            out_shape, self.inputs = w_shape, {"x": x, "dy": dy}
        out.set_output(True).set_dim(list(out_shape)).set_stride(_c_strides(out_shape)).set_data_type(io)
        self.output = out
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        if dtype == np.float32 and not tf32:
            note = getattr(getattr(cudnn, "numerical_note", None), "TENSOR_CORE", None)
            if note is not None:
                graph.deselect_numeric_notes([note])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace_size = int(graph.get_workspace_size())

    def execute(self, xp, handle, out, **arrays) -> None:
        pack = {tensor: arrays[name].data.ptr for name, tensor in self.inputs.items()}
        pack[self.output] = out.data.ptr
        # Pooled: a workspace is a free-list lookup, not a cudaMalloc.
        workspace = xp.empty(max(self.workspace_size, 1), dtype=xp.uint8)
        _cudnn.set_stream(handle=handle, stream=xp.cuda.get_current_stream().ptr)
        self.graph.execute(pack, workspace.data.ptr, handle=handle)


@register_engine("Convolution")
class CuDNNConvolutionLayer(ConvolutionLayer):
    """Caffe's Convolution, computed by cuDNN on the GPU (module doc)."""

    engine = "CUDNN"

    @classmethod
    def engine_chosen(cls, ctx, requested: str) -> bool:
        if requested == "CAFFE":
            return False
        if not ctx.device.is_gpu:
            if requested == "CUDNN":
                _warn_once("cpu", "engine: CUDNN asked for on the CPU: convolutions use the CAFFE "
                                  "(im2col + GEMM) engine there")
            return False
        if cudnn_module() is None:
            _warn_once("missing", f"cuDNN is not available ({_cudnn_error}): convolutions use the CAFFE "
                                  f"(im2col + GEMM) engine; pip install 'caffelite[cudnn]' for cuDNN")
            return False
        return _data_type(np.dtype(ctx.dtype)) is not None

    def setup(self, bottom, top):
        super().setup(bottom, top)
        # cuDNN's graph API convolves 2-D and 3-D images with channels on axis 1.
        self.use_cudnn = self.axis == 1 and len(self.geometry.kernel) in (2, 3)

    def _dft_engine(self):
        return None if self.use_cudnn else super()._dft_engine()

    def _plan(self, kind: str, x_shape, y_shape):
        w_shape = self.blobs[0].shape
        tf32 = tf32_enabled()
        key = (self.device.id, kind, tuple(x_shape), w_shape, tuple(y_shape), self.dtype.str,
               self.geometry.pad, self.geometry.stride, self.geometry.dilation, tf32)
        plan = _plans.get(key)
        if plan is None:
            handle = _handle(self.device.id, self.xp)
            plan = _plans[key] = _Plan(handle, kind, x_shape, w_shape, y_shape, self.dtype,
                                       self.geometry, tf32)
        return plan

    def _ready(self, kinds, x_shape, y_shape) -> bool:
        """Build (or find) the plans for ``kinds``; False, and the im2col path from now on for this
        layer, when cuDNN refuses one. Nothing has been computed yet when it says False."""
        try:
            for kind in kinds:
                self._plan(kind, x_shape, y_shape)
        except Exception as exc:  # cudnnGraphNotSupportedError and friends, at plan build only
            self.use_cudnn = False
            _warn_once(f"refused:{self.name}", f"layer '{self.name}': cuDNN cannot run this convolution "
                                               f"({type(exc).__name__}: {exc}); using the CAFFE engine")
            return False
        return True

    def _run(self, kind: str, x_shape, y_shape, out, **arrays) -> None:
        self._plan(kind, x_shape, y_shape).execute(self.xp, _handle(self.device.id, self.xp), out, **arrays)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if self.use_cudnn:
            # A different shape gets its own cached plans; the bias view is reused.
            self._bias_shape = (1, self.num_output) + (1,) * len(self.out_spatial)

    def forward(self, bottom, top):
        if not (self.use_cudnn and self._ready(("fprop",), bottom[0].shape, top[0].shape)):
            return super().forward(bottom, top)
        w = self.blobs[0].data
        for b, t in zip(bottom, top):
            y = t.data
            self._run("fprop", b.shape, t.shape, y, x=b.data, w=w)
            if self.bias_term:
                y += self.blobs[1].data.reshape(self._bias_shape)

    def backward(self, top, propagate_down, bottom):
        need_w = self.param_propagate_down[0]
        need_b = self.bias_term and self.param_propagate_down[1]
        kinds = (("wgrad",) if need_w else ()) + (("dgrad",) if any(propagate_down) else ())
        if not (self.use_cudnn and self._ready(kinds, bottom[0].shape, top[0].shape)):
            return super().backward(top, propagate_down, bottom)
        axes = (0,) + tuple(range(2, 2 + len(self.out_spatial)))
        w = self.blobs[0].data
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = t.diff
            if need_b:
                self.blobs[1].add_to_diff(dy.sum(axis=axes))
            if need_w:
                dw, overwrite = self.blobs[0].diff_for_update()
                out = dw if overwrite else self._wgrad_scratch(dw)
                self._run("wgrad", b.shape, t.shape, out, x=b.data, dy=dy)
                if not overwrite:
                    dw += out
            if propagate_down[i]:
                self._run("dgrad", b.shape, t.shape, b.diff, dy=dy, w=w)

    def _wgrad_scratch(self, like):
        scratch = getattr(self, "_dw_scratch", None)
        if scratch is None or scratch.shape != like.shape or scratch.dtype != like.dtype:
            scratch = self._dw_scratch = self.xp.empty_like(like)
        return scratch


__all__ = ["CuDNNConvolutionLayer", "cudnn_module", "cudnn_version"]
