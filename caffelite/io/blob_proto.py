"""BlobProto messages <-> NumPy arrays (weights, solver history, mean files).

Caffe writes either ``shape`` or the legacy num/channels/height/width, and
``data`` (float) or ``double_data``; both forms are read.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..proto import pb


def blob_proto_shape(proto) -> tuple:
    if proto.HasField("shape"):
        return tuple(int(d) for d in proto.shape.dim)
    return (proto.num, proto.channels, proto.height, proto.width)


def shape_matches(proto, shape: tuple) -> bool:
    """Caffe's ShapeEquals: legacy 4-d protos match shapes padded with leading 1s."""
    if proto.HasField("shape"):
        return tuple(proto.shape.dim) == tuple(shape)
    return len(shape) <= 4 and (1,) * (4 - len(shape)) + tuple(shape) == blob_proto_shape(proto)


def blob_proto_to_array(proto, diff: bool = False) -> np.ndarray:
    shape = blob_proto_shape(proto)
    if diff:
        values = proto.double_diff if len(proto.double_diff) else proto.diff
    else:
        values = proto.double_data if len(proto.double_data) else proto.data
    dtype = np.float64 if (len(proto.double_diff) if diff else len(proto.double_data)) else np.float32
    array = np.asarray(values, dtype=dtype)
    count = int(np.prod(shape))
    if array.size != count:
        raise DataError(f"a blob of shape {shape} holds {array.size} values instead of {count}")
    return array.reshape(shape)


def array_to_blob_proto(array: np.ndarray, proto=None, diff: np.ndarray | None = None):
    proto = proto if proto is not None else pb.BlobProto()
    proto.shape.dim.extend(array.shape)
    if array.dtype == np.float64:
        proto.double_data.extend(array.ravel().tolist())
        if diff is not None:
            proto.double_diff.extend(diff.ravel().tolist())
    else:
        proto.data.extend(array.astype(np.float32, copy=False).ravel().tolist())
        if diff is not None:
            proto.diff.extend(diff.astype(np.float32, copy=False).ravel().tolist())
    return proto
