"""OpenCV's bilinear resize (``cv::resize`` with INTER_LINEAR), bit for bit, in NumPy.

Caffe resizes with OpenCV, so matching it exactly makes caffelite's databases
and ImageData batches identical to Caffe's.
"""
from __future__ import annotations

import functools

import numpy as np

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


@functools.lru_cache(maxsize=64)
def _linear_table(src: int, dst: int, clamp_weight: bool):
    """Source indices and 11-bit weights of OpenCV's INTER_LINEAR along one axis."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f -= i0.astype(np.float32)
    if clamp_weight:
        # Columns: OpenCV moves border samples onto the edge pixel with weight 1.
        edge = (i0 < 0) | (i0 >= src - 1)
        f[edge] = 0
        i0 = np.clip(i0, 0, src - 1)
        i1 = np.minimum(i0 + 1, src - 1)
    else:
        # Rows: OpenCV keeps the weights and clamps only the row indices.
        i1 = np.clip(i0 + 1, 0, src - 1)
        i0 = np.clip(i0, 0, src - 1)
    w0 = np.rint((np.float32(1) - f) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(f * np.float32(_COEF_SCALE)).astype(np.int32)
    return i0, i1, w0, w1


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's ``cv::resize(..., INTER_LINEAR)`` of an H x W (x C) uint8 image, bit-exact.

    Half-pixel centres; a horizontal pass with 11-bit fixed-point weights
    (border columns take the edge pixel), then a vertical one rounded as
    OpenCV's SIMD kernel does, ``((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1 >> 16) + 2 >> 2``,
    where border rows keep their weights and only the row index is clamped.
    """
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image.copy()
    x0, x1, a0, a1 = _linear_table(src_w, width, True)
    y0, y1, b0, b1 = _linear_table(src_h, height, False)
    pixels = image.reshape(src_h, src_w, -1)
    a0, a1 = a0[:, None], a1[:, None]

    def horizontal(rows):  # value * 2048 >> 4, for the given source rows (all when None)
        picked = pixels if rows is None else pixels[rows]
        out = picked[:, x0].astype(np.int32)
        out *= a0
        out += picked[:, x1].astype(np.int32) * a1
        out >>= 4
        return out

    if 2 * height < src_h:  # shrinking: only the rows the output needs
        top, bottom = horizontal(y0), horizontal(y1)
    else:
        every = horizontal(None)
        top, bottom = every[y0], every[y1]
    top *= b0[:, None, None]
    top >>= 16
    bottom *= b1[:, None, None]
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2
    return top.astype(np.uint8).reshape((height, width) + image.shape[2:])


def resize_chw(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``resize_linear`` for a C x H x W image (the layout of Datums and batches)."""
    return np.ascontiguousarray(resize_linear(image.transpose(1, 2, 0), height, width).transpose(2, 0, 1))
