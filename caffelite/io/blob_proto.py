"""BlobProto messages <-> NumPy arrays (weights, solver history, mean files).

Caffe writes either ``shape`` or the legacy num/channels/height/width, and
``data`` (float) or ``double_data``; both forms are read.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
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


def blob_proto_to_array(proto, diff: bool = False, where: str = "BlobProto") -> np.ndarray:
    """The blob's data (or diff) in its shape: float32, or float64 when stored as double_*."""
    shape = blob_proto_shape(proto)
    if diff:
        values = proto.double_diff if len(proto.double_diff) else proto.diff
    else:
        values = proto.double_data if len(proto.double_data) else proto.data
    dtype = np.float64 if (len(proto.double_diff) if diff else len(proto.double_data)) else np.float32
    array = np.asarray(values, dtype=dtype)
    count = int(np.prod(shape))
    if array.size != count:
        raise DataError(f"{where}: shape {shape} needs {count} values, the file holds {array.size}",
                        hint="the file is truncated or not a Caffe blob")
    return array.reshape(shape)


def array_to_blob_proto(array: np.ndarray, proto=None, diff: np.ndarray | None = None,
                        legacy: bool = False):
    """A BlobProto of ``array`` (and ``diff``); ``legacy`` writes num/channels/height/width
    (1- to 4-d arrays, as Caffe's mean files) instead of ``shape``."""
    array = np.asarray(array)
    proto = proto if proto is not None else pb.BlobProto()
    if legacy:
        if array.ndim > 4:
            raise ConfigError(f"a {array.ndim}-d array cannot use the legacy 4-d BlobProto shape")
        proto.num, proto.channels, proto.height, proto.width = (1,) * (4 - array.ndim) + array.shape
    else:
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
