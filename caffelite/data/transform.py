"""Caffe's DataTransformer, applied to a whole batch at once.

For item n, channel c and output pixel (h, w), with crop offsets (h0, w0)
(random in TRAIN, centred in TEST) and w' = crop_w - 1 - w when the item is
mirrored (probability 0.5 when ``mirror``, any phase)::

    out[n, c, h, w'] = (x[n, c, h0 + h, w0 + w] - mean[c, h0 + h, w0 + w]) * scale

``mean`` is the ``mean_file`` image (taken at the cropped source position) or
``mean_value`` (one value for all channels, or one per channel); never both.
Arithmetic happens in the output dtype, element by element as Caffe does, so
float32 results match Caffe's bit for bit.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..io.binaryproto import read_mean
from .datum import check_color_flags

TRAIN = 0


class DataTransformer:
    """Crop -> mirror -> subtract mean -> scale, for N x C x H x W batches."""

    def __init__(self, param, phase: int, dtype=np.float32, layer: str | None = None):
        self.layer = layer
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.crop_size = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = self.dtype.type(param.scale)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        try:
            check_color_flags(self.force_color, self.force_gray)
        except ConfigError as exc:
            exc.layer = layer
            raise
        if param.HasField("mean_file") and len(param.mean_value):
            raise ConfigError("transform_param has both mean_file and mean_value", layer=layer,
                              hint="use either mean_file or mean_value, not both")
        self.mean = None
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        if self.mean_file:
            self.mean = read_mean(self.mean_file).astype(self.dtype)
        self.mean_value = np.asarray(param.mean_value, dtype=self.dtype) if len(param.mean_value) else None

    @property
    def is_random(self) -> bool:
        """Whether transforming needs random numbers (mirror, or a TRAIN crop)."""
        return self.mirror or (self.crop_size > 0 and self.phase == TRAIN)

    @property
    def is_identity(self) -> bool:
        return (not self.crop_size and not self.mirror and self.mean is None
                and self.mean_value is None and self.scale == 1)

    def output_shape(self, item_shape: tuple) -> tuple:
        """(C, H, W) of one transformed item; checks the settings fit the images."""
        c, h, w = item_shape
        if self.crop_size and (self.crop_size > h or self.crop_size > w):
            raise ConfigError(f"crop_size {self.crop_size} is larger than the {h}x{w} images",
                              layer=self.layer, hint="lower crop_size or resize the images")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise ConfigError(f"mean_file '{self.mean_file}' is {'x'.join(map(str, self.mean.shape))} "
                              f"but the images are {c}x{h}x{w}", layer=self.layer,
                              hint="compute the mean of this database (caffelite compute_image_mean), "
                                   "or use mean_value")
        if self.mean_value is not None and len(self.mean_value) not in (1, c):
            raise ConfigError(f"{len(self.mean_value)} mean_value entries for {c}-channel images",
                              layer=self.layer, hint="give one mean_value, or one per channel")
        if self.crop_size:
            return c, self.crop_size, self.crop_size
        return c, h, w

    def __call__(self, batch: np.ndarray, rng: np.random.Generator | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        """Transform an N x C x H x W batch (uint8 or float) into ``out`` (N x C x h x w, dtype)."""
        n, c, h, w = batch.shape
        oc, oh, ow = self.output_shape((c, h, w))
        if out is None or out.shape != (n, oc, oh, ow) or out.dtype != self.dtype:
            out = np.empty((n, oc, oh, ow), self.dtype)
        if self.is_random and rng is None:
            raise ValueError("a random transform needs a Generator")
        flip = rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        if self.crop_size and self.phase == TRAIN:
            h_off = rng.integers(0, h - oh + 1, size=n)
            w_off = rng.integers(0, w - ow + 1, size=n)
        else:
            h_off = np.full(n, (h - oh) // 2)
            w_off = np.full(n, (w - ow) // 2)
        if flip is None and (h_off[0] == h_off).all() and (w_off[0] == w_off).all():
            h0, w0 = int(h_off[0]), int(w_off[0])
            out[...] = batch[:, :, h0:h0 + oh, w0:w0 + ow]
            if self.mean is not None:
                out -= self.mean[:, h0:h0 + oh, w0:w0 + ow]
        else:
            self._per_item(batch, h_off, w_off, flip, out)
        if self.mean_value is not None:
            out -= self.mean_value[:, None, None]
        if self.scale != 1:
            out *= self.scale
        return out

    def _per_item(self, batch, h_off, w_off, flip, out) -> None:
        """Crops at per-item offsets, mirrored per item, minus the mean at the source pixels.

        One strided copy per item: measured ~15x faster than a fancy-index gather
        (and ~4x faster for the flips) on 256 x 3 x 256 x 256 batches.
        """
        oh, ow = out.shape[2:]
        for i in range(batch.shape[0]):
            window = (slice(None), slice(h_off[i], h_off[i] + oh), slice(w_off[i], w_off[i] + ow))
            src = batch[i][window]
            mean = self.mean[window] if self.mean is not None else None
            if flip is not None and flip[i]:
                src = src[..., ::-1]
                mean = mean[..., ::-1] if mean is not None else None
            out[i] = src
            if mean is not None:
                out[i] -= mean


def check_item_shape(shape: tuple, expected: tuple, what: str) -> None:
    """Every item of a batch must have the batch's first item's shape."""
    if tuple(shape) != tuple(expected):
        raise DataError(f"{what} is {'x'.join(map(str, shape))} but the batch's first item is "
                        f"{'x'.join(map(str, expected))}",
                        hint="every item of a batch needs the same size; resize the images "
                             "(convert_imageset --resize_height/--resize_width) or use batch_size 1")
