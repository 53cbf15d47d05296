"""Where did the numbers stop being finite? The diagnostic pass run after a NaN/Inf loss.

Training checks one scalar per iteration (the loss). Only when it is NaN or
Inf does the solver call ``diagnose(net)``, which looks, in this order, at:

1. the parameters: a layer whose weights are already NaN/Inf was broken by an
   earlier update (its gradient overflowed); the deepest such layer is where
   the backward pass first went wrong, or just above it;
2. the batch in the data layers' tops (layers without bottoms are not rerun:
   that would read the next batch); a non-finite input is a data problem;
3. a forward rerun of the same batch, layer by layer, checking every top: the
   first layer whose tops are non-finite while its bottoms are finite;
4. a backward rerun, layer by layer from the loss, checking the bottom diffs
   and the parameter diffs: the first layer that turns finite diffs into
   non-finite ones.

The rerun overwrites tops and diffs (the run stops anyway). Dropout and other
random layers draw new numbers in the rerun, so a failure may not repeat; the
report then says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Diagnosis:
    """What the diagnostic pass found. ``stage`` is one of 'weights', 'data', 'forward',
    'backward' or None (nothing non-finite was found in the rerun)."""

    stage: str | None
    layer: str | None = None
    layer_type: str | None = None
    blob: str | None = None
    detail: str = ""

    def message(self) -> str:
        return self.detail


def _bad(array) -> str | None:
    """'NaN' or 'Inf' when ``array`` holds such values, else None."""
    if array is None or array.size == 0:
        return None
    xp = _xp_of(array)
    if bool(xp.isfinite(array).all()):
        return None
    return "NaN" if bool(xp.isnan(array).any()) else "Inf"


def _xp_of(array):
    if isinstance(array, np.ndarray):
        return np
    import cupy  # noqa: PLC0415 - only reached with GPU arrays

    return cupy


def _label(net, i: int) -> tuple[str, str]:
    return net.layer_names[i], net.layers[i].type


def diagnose(net) -> Diagnosis:
    """Find the first layer whose output or gradient is not finite (see the module doc)."""
    with np.errstate(all="ignore"):  # the rerun repeats the overflow warnings already shown
        for check in (_check_weights, _check_forward, _check_backward):
            found = check(net)
            if found is not None:
                return found
    return Diagnosis(None, detail="a rerun of the batch gave finite values everywhere (the failure "
                                  "did not repeat: random layers such as Dropout draw new numbers)")


def _check_weights(net) -> Diagnosis | None:
    broken = []
    for i, layer in enumerate(net.layers):
        for j, blob in enumerate(layer.blobs):
            kind = _bad(blob.data)
            if kind is not None:
                broken.append((i, j, kind))
                break
    if not broken:
        return None
    names = ", ".join(f"'{net.layer_names[i]}'" for i, _, _ in broken)
    i, j, kind = broken[-1]
    name, type_ = _label(net, i)
    return Diagnosis("weights", name, type_, f"param {j}",
                     f"the weights of layer(s) {names} hold {kind}: an earlier update diverged; the "
                     f"gradient first stopped being finite in backward at layer '{name}' ({type_}) or a "
                     f"layer above it (with clip_gradients set, the gradient is checked every "
                     f"iteration and the layer is named exactly)")


def _check_forward(net) -> Diagnosis | None:
    for i, layer in enumerate(net.layers):
        bottoms, tops = net.bottom_vecs[i], net.top_vecs[i]
        name, type_ = _label(net, i)
        if not bottoms:  # a data layer: look at the batch it produced, do not read another
            for blob_name, blob in zip(net.top_ids[i], tops):
                kind = _bad(blob.data)
                if kind is not None:
                    return Diagnosis("data", name, type_, blob_name,
                                     f"the input '{blob_name}' from layer '{name}' ({type_}) holds "
                                     f"{kind}: the data itself is not finite")
            continue
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)
        for blob_name, blob in zip(net.top_ids[i], tops):
            kind = _bad(blob.data)
            if kind is not None:
                return Diagnosis("forward", name, type_, blob_name,
                                 f"layer '{name}' ({type_}) produced {kind} in its output "
                                 f"'{blob_name}' from finite inputs (forward)")
    return None


def _check_backward(net) -> Diagnosis | None:
    for layer, tops in zip(net.layers, net.top_vecs):  # seed the loss tops as Net.backward does
        for blob, weight in zip(tops, layer.loss_weights):
            if weight:
                blob.diff[...] = weight
    for i in reversed(range(len(net.layers))):
        if not net.layer_need_backward[i]:
            continue
        layer = net.layers[i]
        name, type_ = _label(net, i)
        for blob in layer.blobs:
            blob.diff[...] = 0
        layer.backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
        for j, (blob_name, blob) in enumerate(zip(net.bottom_ids[i], net.bottom_vecs[i])):
            if net.bottom_need_backward[i][j]:
                kind = _bad(blob.diff)
                if kind is not None:
                    return Diagnosis("backward", name, type_, blob_name,
                                     f"layer '{name}' ({type_}) produced {kind} in the gradient of "
                                     f"its input '{blob_name}' from finite gradients (backward)")
        for j, (blob, need) in enumerate(zip(layer.blobs, layer.param_propagate_down)):
            kind = _bad(blob.diff) if need else None
            if kind is not None:
                return Diagnosis("backward", name, type_, f"param {j}",
                                 f"layer '{name}' ({type_}) produced {kind} in the gradient of its "
                                 f"param {j} (backward)")
    return None


def nonfinite_params(net) -> str | None:
    """The first layer (by name) whose weights are not finite, or None. One pass over the weights."""
    for name, layer in zip(net.layer_names, net.layers):
        for blob in layer.blobs:
            if _bad(blob.data) is not None:
                return name
    return None


__all__ = ["Diagnosis", "diagnose", "nonfinite_params"]
