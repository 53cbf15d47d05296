"""Caffe's Datum records: bytes <-> (C x H x W array, label).

A Datum holds one item: ``channels``, ``height``, ``width``, a ``label`` and
either raw uint8 pixels in ``data`` (C x H x W, BGR as OpenCV reads), float
values in ``float_data``, or, when ``encoded``, the bytes of a PNG/JPEG file.
Encoded images are decoded with Pillow into C x H x W BGR uint8, with the
channel rules of Caffe's OpenCV path: native channels (grey stays 1, colour
becomes 3, alpha is dropped), or 3 with ``force_color``, 1 with ``force_gray``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..proto import pb

# Pillow modes that OpenCV's IMREAD_ANYCOLOR keeps as one grey channel.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def where(key=None, source=None) -> str:
    """'record KEY of DB' for error messages."""
    text = "record"
    if key is not None:
        text += f" '{key.decode(errors='replace') if isinstance(key, (bytes, bytearray)) else key}'"
    if source is not None:
        text += f" of '{source}'"
    return text


def parse_datum(value: bytes, key=None, source=None) -> "pb.Datum":
    datum = pb.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:  # protobuf's DecodeError
        raise DataError(f"{where(key, source)} is not a Datum",
                        hint="the database was not written by convert_imageset / caffelite") from None
    return datum


def check_color_flags(force_color: bool, force_gray: bool) -> None:
    if force_color and force_gray:
        raise ConfigError("force_color and force_gray cannot both be set",
                          hint="keep one of them in transform_param")


def datum_shape(datum, force_color: bool = False, force_gray: bool = False,
                key=None, source=None) -> tuple:
    """(C, H, W) of the item, reading only the header of an encoded image."""
    if datum.encoded:
        image = _open_image(datum.data, key, source)
        channels = 3 if force_color else 1 if force_gray else (1 if image.mode in _GREY_MODES else 3)
        return channels, image.height, image.width
    _check_raw(datum, key, source)
    return datum.channels, datum.height, datum.width


def datum_to_array(datum, force_color: bool = False, force_gray: bool = False,
                   key=None, source=None) -> np.ndarray:
    """The item as C x H x W: uint8 for pixels (decoded if encoded), float32 for float_data."""
    if datum.encoded:
        return decode_image(datum.data, force_color, force_gray, key=key, source=source)
    c, h, w = _check_raw(datum, key, source)
    if datum.data:
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def decode_datum(value: bytes, force_color: bool = False, force_gray: bool = False,
                 key=None, source=None) -> tuple[np.ndarray, int]:
    """Serialized Datum bytes -> (C x H x W array, label)."""
    datum = parse_datum(value, key, source)
    return datum_to_array(datum, force_color, force_gray, key, source), datum.label


def array_to_datum(array: np.ndarray, label: int = 0, encode: str | None = None,
                   quality: int = 95) -> "pb.Datum":
    """A Datum of a C x H x W array: uint8 -> ``data``, float -> ``float_data``.

    ``encode`` ('png' or 'jpg') stores the uint8 BGR image as that file format.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ConfigError(f"a Datum holds a C x H x W array, got shape {array.shape}")
    c, h, w = array.shape
    datum = pb.Datum(channels=c, height=h, width=w, label=int(label))
    if encode:
        datum.data = encode_image(array, encode, quality)
        datum.encoded = True
    elif array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    return datum


def encode_datum(array: np.ndarray, label: int = 0, encode: str | None = None) -> bytes:
    """C x H x W array and label -> serialized Datum bytes."""
    return array_to_datum(array, label, encode).SerializeToString()


# ---- images ------------------------------------------------------------------
def decode_image(data: bytes, force_color: bool = False, force_gray: bool = False,
                 key=None, source=None) -> np.ndarray:
    """PNG/JPEG/... bytes -> C x H x W uint8, BGR for colour (as OpenCV decodes)."""
    check_color_flags(force_color, force_gray)
    image = _open_image(data, key, source)
    try:
        if force_gray and image.format == "JPEG" and image.mode not in _GREY_MODES:
            # libjpeg's own YCbCr -> grey, which is what OpenCV asks libjpeg for.
            image.draft("L", image.size)
        image.load()
        return _to_chw(image, force_color, force_gray)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where(key, source)}: cannot decode the encoded image ({exc})",
                        hint="the record is corrupt; re-create the database") from None


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """C x H x W uint8 (BGR when 3 channels) -> PNG or JPEG bytes (OpenCV's default quality 95)."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpg", "jpeg"):
        raise ConfigError(f"unknown encode_type '{fmt}'", hint="use png or jpg")
    array = np.asarray(array, dtype=np.uint8)
    if array.shape[0] == 1:
        image = Image.fromarray(array[0], "L")
    elif array.shape[0] == 3:
        image = Image.fromarray(np.ascontiguousarray(array[::-1].transpose(1, 2, 0)), "RGB")
    else:
        raise ConfigError(f"cannot encode an image with {array.shape[0]} channels", hint="use 1 or 3")
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _open_image(data: bytes, key, source) -> Image.Image:
    if not data:
        raise DataError(f"{where(key, source)} is encoded but holds no image bytes",
                        hint="the record is corrupt; re-create the database")
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where(key, source)}: cannot decode the encoded image ({exc})",
                        hint="the record is corrupt; re-create the database") from None


def _to_chw(image: Image.Image, force_color: bool, force_gray: bool) -> np.ndarray:
    grey = image.mode in _GREY_MODES
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
            values = values >> 8  # 16-bit: OpenCV without IMREAD_ANYDEPTH keeps the high byte
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if force_color or not (grey or force_gray):
        rgb = np.asarray(image.convert("RGB"))
        return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))
    if grey:
        return np.asarray(image.convert("L"))[None].copy()
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if image.format == "PNG":
        # libpng's rgb-to-gray, which OpenCV's PNG decoder uses: 15-bit weights, truncated.
        y = (9797 * r + 19234 * g + 3737 * b) >> 15
    else:
        # OpenCV's BGR2GRAY fixed point (14 bits).
        y = (4899 * r + 9617 * g + 1868 * b + 8192) >> 14
    return y.astype(np.uint8)[None]


def _check_raw(datum, key, source) -> tuple:
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0 or h <= 0 or w <= 0:
        raise DataError(f"{where(key, source)} has shape {c}x{h}x{w}",
                        hint="the record is corrupt; re-create the database")
    count = c * h * w
    if datum.data:
        if len(datum.data) != count:
            raise DataError(f"{where(key, source)} holds {len(datum.data)} bytes of pixels but its "
                            f"shape {c}x{h}x{w} needs {count}",
                            hint="the record is corrupt; re-create the database")
    elif len(datum.float_data) != count:
        if not len(datum.float_data):
            raise DataError(f"{where(key, source)} holds no data",
                            hint="the record is empty; re-create the database")
        raise DataError(f"{where(key, source)} holds {len(datum.float_data)} float values but its "
                        f"shape {c}x{h}x{w} needs {count}",
                        hint="the record is corrupt; re-create the database")
    return c, h, w
