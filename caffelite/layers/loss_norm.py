"""What loss and metric layers over class labels share.

- ``normalizer``: Caffe's ``LossLayer::GetNormalizer``, the number a summed
  loss is divided by;
- ``get_normalization``: the mode, with the legacy ``normalize`` field applied;
- ``label_indices``: the label bottom as integer class indices, checked
  against the scores' shape and range.
"""
from __future__ import annotations

import numpy as np

from ..backend import DEFERRED
from ..errors import DataError
from ..proto import pb

FULL = pb.LossParameter.FULL
VALID = pb.LossParameter.VALID
BATCH_SIZE = pb.LossParameter.BATCH_SIZE
NONE = pb.LossParameter.NONE


def get_normalization(loss_param, default: int = VALID) -> int:
    """The NormalizationMode to use.

    An explicit ``normalization`` wins. Otherwise the deprecated ``normalize``,
    when set, maps true -> VALID and false -> BATCH_SIZE (Caffe ignores
    ``normalize`` whenever ``normalization`` is given). With neither,
    ``default``: the layer's own default, e.g. BATCH_SIZE for
    SigmoidCrossEntropyLoss.
    """
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return VALID if loss_param.normalize else BATCH_SIZE
    return default


def normalizer(mode: int, outer: int, inner: int, valid_count: int = -1) -> float:
    """The divisor of a summed loss, floored at 1.

    FULL = outer * inner; VALID = ``valid_count`` (the non-ignored targets;
    -1 means nothing is ignored, i.e. outer * inner); BATCH_SIZE = outer;
    NONE = 1.
    """
    if mode == FULL:
        n = outer * inner
    elif mode == VALID:
        n = outer * inner if valid_count == -1 else valid_count
    elif mode == BATCH_SIZE:
        n = outer
    elif mode == NONE:
        n = 1
    else:
        raise ValueError(f"unknown normalization mode {mode}")
    return float(max(1, n))


def valid_normalizer(xp, mode: int, outer: int, inner: int, valid):
    """``normalizer`` with VALID counting the True positions of the device mask ``valid``.

    On the CPU a float, exactly ``normalizer(..., int(valid.sum()))``; on the GPU the count stays
    on the device (a 0-d float32 array: dividing by it needs no host round trip).
    """
    if valid is None or mode != VALID:
        return normalizer(mode, outer, inner, -1 if valid is None else outer * inner)
    if xp is np:
        return normalizer(mode, outer, inner, int(valid.sum()))
    return xp.maximum(valid.sum(), 1).astype(xp.float32)


def clipped_log(xp, p, floor: float):
    """log(max(p, floor)); float16/bfloat16 probabilities are taken to float32 first, where
    Caffe's floors (FLT_MIN, 1e-20) exist (in float16 they would round to 0: log 0 = -inf)."""
    if p.dtype.itemsize < 4:
        p = p.astype(xp.float32)
    return xp.log(xp.maximum(p, floor))


def check_label_count(layer, scores_shape: tuple, axis: int, label_count: int) -> tuple[int, int]:
    """(outer, inner) around ``axis`` of the scores; the label must hold outer*inner values."""
    outer = _prod(scores_shape[:axis])
    inner = _prod(scores_shape[axis + 1:])
    if label_count != outer * inner:
        raise layer.error(
            f"the label has {label_count} values but the scores {scores_shape} need "
            f"{outer * inner}, one per position outside axis {axis}",
            hint="with scores (N, C, H, W) and axis 1 the label must hold N*H*W integer "
                 "values in 0..C-1, e.g. shape (N,) or (N, 1, H, W)")
    return outer, inner


def label_indices(layer, label, outer: int, inner: int, num_classes: int, ignore_label=None):
    """The label blob's data as int64 class indices of shape (outer, inner).

    Returns ``(index, valid)``: ``valid`` is a bool mask of the non-ignored
    positions (None without an ignore_label) and ``index`` has ignored
    positions set to 0, so it can index the scores safely. A label outside
    [0, num_classes) that is not ignored raises a DataError.
    """
    xp = layer.xp
    # Labels arrive as floats; Caffe's static_cast<int> truncates toward zero.
    index = label.data.reshape(outer, inner).astype(xp.int64)
    valid = None
    if ignore_label is not None:
        valid = index != ignore_label
        index = xp.where(valid, index, 0)
    bad = (index < 0) | (index >= num_classes)

    def error(first, value):
        return DataError(
            f"({layer.type}) label {int(value)} at position {int(first)} is outside the "
            f"{num_classes} classes [0, {num_classes})", layer=layer.name,
            hint="check the data's labels, the scores' num_output, or set "
                 "loss_param.ignore_label / accuracy_param.ignore_label for labels to skip")

    if xp is not np and DEFERRED.active:
        # No host round trip per batch: the flag is read with the losses at display time, and
        # meanwhile the indices are clipped so that nothing reads outside the scores.
        flat = bad.reshape(-1)
        first = xp.argmax(flat)  # 0-d device arrays: nothing is read here
        DEFERRED.add(flat.any(), (first, xp.take(index.reshape(-1), first)), error)
        return xp.clip(index, 0, num_classes - 1), valid
    if bool(bad.any()):
        first = int(xp.argmax(bad.reshape(-1)))
        raise error(first, int(index.reshape(-1)[first]))
    return index, valid


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
