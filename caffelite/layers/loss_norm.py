"""What loss and metric layers over class labels share.

- ``normalizer``: Caffe's ``LossLayer::GetNormalizer``, the number a summed
  loss is divided by;
- ``get_normalization``: the mode, with the legacy ``normalize`` field applied;
- ``label_indices``: the label bottom as integer class indices, checked
  against the scores' shape and range.
"""
from __future__ import annotations

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


def check_label_count(layer, scores_shape: tuple, axis: int, label_count: int) -> tuple[int, int]:
    """(outer, inner) around ``axis`` of the scores; the label must hold outer*inner values."""
    outer = _prod(scores_shape[:axis])
    inner = _prod(scores_shape[axis + 1:])
    if label_count != outer * inner:
        raise layer.error(
            f"the label has {label_count} values but the scores {scores_shape} need "
            f"{outer * inner}, one per position outside axis {axis}",
            hint=f"with scores (N, C, H, W) and axis 1 the label must hold N*H*W integer "
                 f"values in 0..C-1, e.g. shape (N,) or (N, 1, H, W)")
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
    if bool(bad.any()):
        first = int(xp.argmax(bad.reshape(-1)))
        value = int(index.reshape(-1)[first])
        raise DataError(
            f"({layer.type}) label {value} at position {first} is outside the "
            f"{num_classes} classes [0, {num_classes})", layer=layer.name,
            hint="check the data's labels, the scores' num_output, or set "
                 "loss_param.ignore_label / accuracy_param.ignore_label for labels to skip")
    return index, valid


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
