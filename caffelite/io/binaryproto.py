"""BlobProto files (``mean.binaryproto``) as NumPy arrays.

Caffe's ``compute_image_mean`` writes a BlobProto with the legacy 4-d shape
fields ``num x channels x height x width`` = 1 x C x H x W; newer writers use
``shape { dim ... }``. Both are read; legacy fields are written for 1- to 4-d
arrays (what Caffe itself writes and reads back), ``shape`` beyond that.
"""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..proto import pb
from .atomic import write_bytes
from .blob_proto import array_to_blob_proto, blob_proto_to_array


def read_binaryproto(path: str) -> np.ndarray:
    """The array stored in a BlobProto file (legacy files come back 4-d: 1 x C x H x W)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"binaryproto file '{path}' does not exist",
                        hint="create a mean file with caffelite compute_image_mean") from None
    except OSError as exc:
        raise DataError(f"cannot read binaryproto file '{path}': {exc.strerror}") from None
    proto = pb.BlobProto()
    try:
        proto.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError
        raise DataError(f"'{path}' is not a BlobProto (binaryproto) file") from None
    return blob_proto_to_array(proto, where=f"'{path}'")


def read_mean(path: str) -> np.ndarray:
    """A mean image file as a C x H x W array (the leading num must be 1)."""
    mean = read_binaryproto(path)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"mean file '{path}' holds a blob of shape {mean.shape}; "
                        "expected 1 x C x H x W", hint="create it with caffelite compute_image_mean")
    return mean


def write_binaryproto(path: str, array: np.ndarray, legacy: bool | None = None) -> None:
    """Write ``array`` as a BlobProto, atomically (a crash leaves the previous file);
    ``legacy`` (default: for 1- to 4-d arrays) writes num/channels/height/width."""
    array = np.asarray(array)
    legacy = array.ndim <= 4 if legacy is None else legacy
    write_bytes(path, array_to_blob_proto(array, legacy=legacy).SerializeToString())
