"""Helpers for layer tests: build one layer, run it, check its gradients.

The gradient check uses central differences in float64 with a random
projection of the tops as the loss: L = sum_k sum(R_k * top_k). Elements at a
kink (ReLU at 0, a max-pooling tie) are found by comparing two step sizes and
skipped, as Caffe's checker skips its kink range. It runs on the CPU.

``make_layer(..., device=...)`` builds a layer on a GPU too (tests take the
``device`` fixture of conftest.py); ``compare_devices`` runs a layer in float32
on the CPU and on a device and asserts that forward and backward agree.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
from google.protobuf import json_format

from caffelite.backend import CPU
from caffelite.blob import Blob
from caffelite.layers.base import TEST, LayerContext
from caffelite.proto import pb
from caffelite.registry import LAYERS


def layer_param(type: str, name: str = "layer", **fields) -> "pb.LayerParameter":
    """A LayerParameter from Caffe field names, e.g. ``convolution_param={"num_output": 4}``."""
    msg = pb.LayerParameter(name=name, type=type)
    json_format.ParseDict(fields, msg)
    return msg


def make_layer(type: str, *, phase: int = TEST, dtype=np.float64, seed: int = 1701, device=CPU,
               engine_choice: bool = False, **fields):
    """A layer of ``type`` on ``device``; ``engine_choice`` picks its class as a Net would (the
    ``engine`` field: cuDNN on a GPU where available), else the type's own class."""
    ctx = LayerContext(phase=phase, dtype=np.dtype(dtype), seed=seed, device=device)
    param = layer_param(type, **fields)
    if engine_choice:
        from caffelite.registry import layer_class

        return layer_class(param, ctx)(param, ctx)
    return LAYERS.get(type)(param, ctx)


def setup(layer, bottom_arrays: Sequence[np.ndarray], num_top: int = 1):
    """Create blobs holding ``bottom_arrays`` and ``num_top`` tops, then set the layer up."""
    bottom = []
    for i, array in enumerate(bottom_arrays):
        blob = Blob(np.shape(array), layer.dtype, layer.device, name=f"bottom{i}")
        blob.set_data(np.asarray(array))
        bottom.append(blob)
    top = [Blob((), layer.dtype, layer.device, name=f"top{i}") for i in range(num_top)]
    layer.layer_setup(bottom, top)
    return bottom, top


def forward(layer, bottom, top) -> list[np.ndarray]:
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [t.cpu_data().copy() for t in top]


def run(type: str, bottom_arrays, num_top: int = 1, **kwargs):
    """Build, set up and run ``type`` once; returns (layer, bottom, top, outputs)."""
    layer = make_layer(type, **kwargs)
    bottom, top = setup(layer, bottom_arrays, num_top)
    return layer, bottom, top, forward(layer, bottom, top)


def check_gradient(layer, bottom: list[Blob], top: list[Blob], *,
                   check_bottom: Sequence[int] | None = None, check_params: bool = True,
                   step: float = 1e-5, rtol: float = 1e-4, atol: float = 1e-7,
                   max_checks: int = 150, seed: int = 0) -> int:
    """Compare ``layer.backward`` with central differences; returns the number checked.

    ``check_bottom``: indices of bottoms to check (default all).
    At most ``max_checks`` randomly chosen elements are checked per blob.
    """
    rs = np.random.default_rng(seed)
    if check_bottom is None:
        check_bottom = range(len(bottom))
    rng_state = layer.rng.bit_generator.state

    def objective() -> float:
        layer.rng.bit_generator.state = rng_state
        outs = forward(layer, bottom, top)
        return float(sum(np.sum(r * o) for r, o in zip(projections, outs)))

    layer.rng.bit_generator.state = rng_state
    outs = forward(layer, bottom, top)
    projections = [rs.standard_normal(o.shape) for o in outs]

    objective()
    for t, r in zip(top, projections):
        t.set_diff(r)
    for b in layer.blobs:
        b.set_diff(0)
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    targets = [(f"bottom {i}", bottom[i], bottom[i].cpu_diff().copy()) for i in check_bottom]
    if check_params:
        targets += [(f"param {i}", b, b.cpu_diff().copy())
                    for i, b in enumerate(layer.blobs) if layer.param_propagate_down[i]]

    checked = 0
    for label, blob, analytic in targets:
        flat_count = blob.count
        picks = rs.choice(flat_count, size=min(flat_count, max_checks), replace=False)
        for idx in picks:
            pos = np.unravel_index(idx, blob.shape)
            estimates = []
            for h in (step, 4 * step):
                data = blob.mutable_cpu_data()
                original = data[pos]
                data[pos] = original + h
                plus = objective()
                data = blob.mutable_cpu_data()
                data[pos] = original - h
                minus = objective()
                blob.mutable_cpu_data()[pos] = original
                estimates.append((plus - minus) / (2 * h))
            numeric, coarse = estimates
            scale = max(abs(numeric), abs(coarse), 1.0)
            if abs(numeric - coarse) > 1e-3 * scale:
                continue  # a kink between the two steps
            got = analytic[pos]
            assert abs(got - numeric) <= atol + rtol * max(abs(got), abs(numeric), 1e-2), (
                f"{layer.type} '{layer.name}' {label} at {pos}: analytic {got:.8g} "
                f"vs numeric {numeric:.8g}")
            checked += 1
    objective()
    return checked


def compare_devices(type: str, bottom_arrays, device, *, num_top: int = 1, in_place: bool = False,
                    check_bottom: Sequence[int] | None = None, rtol: float = 2e-4, atol: float = 2e-5,
                    engine_choice: bool = True, **kwargs):
    """Run layer ``type`` in float32 on the CPU and on ``device`` with the same parameters, inputs
    and top diffs; assert tops, bottom diffs and parameter diffs agree within float32 tolerance.

    ``check_bottom``: bottoms that get a gradient (default all). ``in_place``: top 0 is bottom 0.
    Returns the CPU results ``(tops, bottom diffs, param diffs)``.
    """
    if check_bottom is None:
        check_bottom = range(len(bottom_arrays))
    arrays = [np.asarray(a, np.float32) for a in bottom_arrays]
    results = []
    with full_float32():
        for dev in (CPU, device):
            results.append(_run_on(type, arrays, dev, num_top, in_place, check_bottom, engine_choice,
                                   kwargs))
    (cpu_tops, cpu_dx, cpu_dw), (dev_tops, dev_dx, dev_dw) = results
    where = f"{type} on {device}"
    for kind, expected, got in (("top", cpu_tops, dev_tops), ("bottom diff", cpu_dx, dev_dx),
                                ("param diff", cpu_dw, dev_dw)):
        assert len(expected) == len(got), f"{where}: {kind} count"
        for i, (e, g) in enumerate(zip(expected, got)):
            assert g.dtype == np.float32, f"{where}: {kind} {i} is {g.dtype}"
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=f"{where}: {kind} {i}")
    return cpu_tops, cpu_dx, cpu_dw


@contextlib.contextmanager
def full_float32():
    """TF32 off for the block: a GPU's float32 GEMMs then round like the CPU's (within float32
    tolerance); TF32 keeps only 10 mantissa bits."""
    from caffelite.backend import set_tf32, tf32_enabled

    before = tf32_enabled()
    set_tf32(False)
    try:
        yield
    finally:
        set_tf32(before)


def _run_on(type, arrays, dev, num_top, in_place, check_bottom, engine_choice, kwargs):
    """One float32 forward and backward of ``type`` on ``dev``: (tops, bottom diffs, param diffs)."""
    layer = make_layer(type, dtype=np.float32, device=dev, engine_choice=engine_choice, **kwargs)
    if in_place:
        bottom = [Blob(a.shape, np.float32, dev, name=f"bottom{i}") for i, a in enumerate(arrays)]
        for blob, a in zip(bottom, arrays):
            blob.set_data(a)
        top = [bottom[0]]
        layer.layer_setup(bottom, top)
    else:
        bottom, top = setup(layer, arrays, num_top)
    outs = forward(layer, bottom, top)
    rs = np.random.default_rng(0)
    for t, o in zip(top, outs):
        t.set_diff(rs.standard_normal(o.shape).astype(np.float32))
    for b in layer.blobs:
        b.set_diff(0)
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    bottom_diffs = [bottom[i].cpu_diff().copy() for i in range(len(bottom)) if propagate[i]]
    param_diffs = [b.cpu_diff().copy() for i, b in enumerate(layer.blobs)
                   if layer.param_propagate_down[i]]
    return outs, bottom_diffs, param_diffs
