"""WindowData: foreground and background windows of images, warped to crop_size (R-CNN).

The window file (``window_data_param.source``) repeats, per image::

    # image_index
    image_path
    channels
    height
    width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows lines, pixel corners inclusive)

A window with overlap >= fg_threshold is foreground (its class_index must be
> 0); one with overlap < bg_threshold is background and gets label 0; others
are dropped. Each batch holds batch_size - int(batch_size * fg_fraction)
background windows, then the foreground ones, each drawn uniformly.

Per window (Caffe's WindowDataLayer): with context_pad > 0 or crop_mode
"square" the box is widened (squared) so that, warped to crop_size, exactly
context_pad pixels of context surround it; the part outside the image is
left 0. The box is resized to its share of crop_size x crop_size with
OpenCV's INTER_LINEAR (the "warp"), mirrored with probability 0.5 when
``mirror``, and written as (pixel - mean) * scale, the mean being mean_file's
centre crop or mean_value. Images are read in colour (3 channels, BGR).
crop_size, mirror and mean come from transform_param (window_data_param's
legacy copies when unset); scale is window_data_param.scale, as in Caffe (or
transform_param.scale when only that is set, which Caffe would ignore).
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..data.resize import resize_chw as resize_linear
from ..data.transform import DataTransformer, merged_transform_param
from ..errors import DataError
from ..registry import register_layer
from .prefetching_layer import PrefetchingDataLayer, decode_planar

FILE_HINT = ("a window file repeats '# index', the image path, channels, height, width, the "
             "window count, then one 'class overlap x1 y1 x2 y2' line per window")
PREFETCH = 4


def _cround(x) -> int:
    """C's round(): halves away from zero."""
    x = float(x)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def read_window_file(source: str, root: str, fg_threshold: float, bg_threshold: float):
    """(image paths, foreground windows, background windows, per-window line numbers).

    A window is a row (image position, label, x1, y1, x2, y2) of an int64 array.
    """
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"window file '{source}' does not exist", hint=FILE_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read window file '{source}': {exc}", hint=FILE_HINT) from None
    tokens = [(tok, number) for number, line in enumerate(lines, 1) for tok in line.split()]
    if not tokens:
        raise DataError(f"window file '{source}' is empty", hint=FILE_HINT)
    fg_threshold, bg_threshold = np.float32(fg_threshold), np.float32(bg_threshold)
    pos = 0

    def take(kind, what):
        nonlocal pos
        if pos >= len(tokens):
            raise DataError(f"ends where {what} was expected", file=source,
                            line=len(lines), hint=FILE_HINT)
        text, number = tokens[pos]
        pos += 1
        try:
            return kind(text), number
        except ValueError:
            raise DataError(f"'{text}' is not a valid {what}", file=source, line=number,
                            hint=FILE_HINT) from None

    images, fg, bg, fg_lines, bg_lines = [], [], [], [], []
    while pos < len(tokens):
        mark, number = take(str, "'#'")
        if mark != "#":
            raise DataError(f"expected '# image_index', found '{mark}'", file=source, line=number,
                            hint=FILE_HINT)
        take(int, "image index")
        path, _ = take(str, "image path")
        for what in ("channel count", "height", "width"):
            take(int, what)
        count, _ = take(int, "window count")
        images.append(os.path.join(root, path) if root else path)
        for _ in range(count):
            label, number = take(int, "class index")
            overlap, _ = take(np.float32, "overlap")  # compared in float, as Caffe does
            box = [take(int, name)[0] for name in ("x1", "y1", "x2", "y2")]
            if overlap >= fg_threshold:
                if label <= 0:
                    raise DataError(f"foreground window (overlap {overlap:g} >= {fg_threshold:g}) has "
                                    f"class {label}; classes of objects start at 1", file=source,
                                    line=number, hint="class 0 is the background")
                fg.append([len(images) - 1, label, *box])
                fg_lines.append(number)
            elif overlap < bg_threshold:
                bg.append([len(images) - 1, 0, *box])
                bg_lines.append(number)
    as_array = lambda rows: np.asarray(rows, np.int64).reshape(-1, 6)  # noqa: E731
    return images, as_array(fg), as_array(bg), fg_lines, bg_lines


@register_layer("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    """Tops: data (batch_size, 3, crop_size, crop_size), label (batch_size,)."""

    param_name = "window_data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("window_data_param.source is not set", hint="give the window file")
        self.batch_size = self._check_batch_size(p.batch_size, "window_data_param.batch_size")
        if p.crop_mode not in ("warp", "square"):
            raise self.error(f"unknown crop_mode '{p.crop_mode}'", hint="use warp or square")
        # WindowData keeps its own scale field; the other three move as in Caffe's upgrade.
        tp = merged_transform_param(self.layer_param, "window_data_param", ("mean_file", "crop_size", "mirror"))
        self.transformer = t = DataTransformer(tp, self.phase, self.dtype, layer=self.name)
        self.crop = t.crop_size
        if self.crop <= 0:
            raise self.error("needs a crop_size (the size windows are warped to)",
                             hint="set transform_param.crop_size")
        self.context_pad = int(p.context_pad)
        if 2 * self.context_pad >= self.crop:
            raise self.error(f"context_pad {self.context_pad} leaves no room in crop_size {self.crop}",
                             hint="context_pad must be less than crop_size / 2")
        self.square = p.crop_mode == "square"
        # Caffe reads window_data_param.scale only; transform_param.scale is honoured when that is unset.
        scale = p.scale if p.HasField("scale") or not tp.HasField("scale") else tp.scale
        self.scale = self.dtype.type(scale)
        self._check_mean()
        self.source = p.source
        self.images, self.fg, self.bg, self.fg_lines, self.bg_lines = read_window_file(
            p.source, p.root_folder, p.fg_threshold, p.bg_threshold)
        self.num_fg = int(np.float32(self.batch_size) * np.float32(p.fg_fraction))
        for windows, count, kind in ((self.fg, self.num_fg, "foreground"),
                                     (self.bg, self.batch_size - self.num_fg, "background")):
            if count and not len(windows):
                raise DataError(f"window file '{p.source}' has no {kind} windows but a batch needs {count}",
                                hint="check fg_threshold/bg_threshold and fg_fraction")
        self._cache = {}
        if p.cache_images:
            self._cache = {path: self._read_file(path) for path in set(self.images)}
        top[0].reshape((self.batch_size, 3, self.crop, self.crop))
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_stream()
        self._init_prefetch(PREFETCH)

    def _check_mean(self) -> None:
        t, crop = self.transformer, self.crop
        self.mean = t.mean
        if t.mean is not None:
            c, h, w = t.mean.shape
            off = (w - crop) // 2
            if c != 3 or off < 0 or off + crop > h:
                raise self.error(f"mean_file '{t.mean_file}' is {c}x{h}x{w}; WindowData needs "
                                 f"3 channels of at least {crop}x{crop}",
                                 hint="use the mean of the images the net was trained on")
            self.mean_off = off
        if t.mean_value is not None and len(t.mean_value) not in (1, 3):
            raise self.error(f"{len(t.mean_value)} mean_value entries for 3-channel images",
                             hint="give one mean_value, or one per channel")

    # ---- loading ------------------------------------------------------------------
    def _read_file(self, path: str) -> bytes:
        if path in self._cache:
            return self._cache[path]
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"cannot read image '{path}' named in window file '{self.source}': "
                            f"{exc.strerror or exc}", hint="check the path and root_folder") from None

    def load_batch(self, index: int, batch) -> None:
        """Sample, crop, warp and write batch ``index`` (runs in a worker thread)."""
        n, num_fg = self.batch_size, self.num_fg
        rng = self.batch_rng(index)
        bg = rng.integers(len(self.bg), size=n - num_fg) if n > num_fg else np.zeros(0, np.int64)
        fg = rng.integers(len(self.fg), size=num_fg) if num_fg else np.zeros(0, np.int64)
        flips = rng.integers(0, 2, size=n).astype(bool) if self.transformer.mirror else np.zeros(n, bool)
        picks = [(self.bg[i], self.bg_lines[i]) for i in bg] + [(self.fg[i], self.fg_lines[i]) for i in fg]
        out = batch.array("data", (n, 3, self.crop, self.crop), self.dtype)
        out[...] = 0  # context outside the image stays 0, as in Caffe
        images = {}
        for item, ((image_id, _, x1, y1, x2, y2), line) in enumerate(picks):
            image = images.get(image_id)
            if image is None:
                path = self.images[image_id]
                image = images[image_id] = decode_planar(self._read_file(path), True, False, path,
                                                       self.source)
            self._warp(image, (int(x1), int(y1), int(x2), int(y2)), bool(flips[item]), out[item], line)
        batch.array("label", (n,), self.dtype)[...] = [window[1] for window, _ in picks]

    def _warp(self, image: np.ndarray, box, mirror: bool, out: np.ndarray, line: int) -> None:
        """Caffe's per-window crop: context, clipping, warp, mirror, mean, scale into ``out``."""
        _, rows, cols = image.shape
        x1, y1, x2, y2 = box
        crop = self.crop
        size_h = size_w = crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            d = self.dtype.type  # Caffe does this arithmetic in Dtype
            context_scale = d(crop) / d(crop - 2 * self.context_pad)
            half_h, half_w = d((y2 - y1 + 1) / 2.0), d((x2 - x1 + 1) / 2.0)
            centre_x, centre_y = d(x1) + half_w, d(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _cround(centre_x - half_w * context_scale), _cround(centre_x + half_w * context_scale)
            y1, y2 = _cround(centre_y - half_h * context_scale), _cround(centre_y + half_h * context_scale)
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            scale_x, scale_y = d(crop) / d(unclipped_w), d(crop) / d(unclipped_h)
            size_w = _cround(d(x2 - x1 + 1) * scale_x)
            size_h = _cround(d(y2 - y1 + 1) * scale_y)
            pad_h = _cround(d(pad_y1) * scale_y)
            pad_w = _cround(d(pad_x2 if mirror else pad_x1) * scale_x)  # the padding mirrors too
            size_h, size_w = min(size_h, crop - pad_h), min(size_w, crop - pad_w)
        if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows):
            raise DataError(f"window ({box[0]}, {box[1]}, {box[2]}, {box[3]}) is not inside its "
                            f"{cols}x{rows} image", file=self.source, line=line,
                            hint="corners are pixel indices x1 <= x2 < width, y1 <= y2 < height")
        if size_h <= 0 or size_w <= 0:
            return
        warped = resize_linear(image[:, y1:y2 + 1, x1:x2 + 1], size_h, size_w)
        if mirror:
            warped = warped[:, :, ::-1]
        target = out[:, pad_h:pad_h + size_h, pad_w:pad_w + size_w]
        if self.mean is not None:
            top, left = self.mean_off + pad_h, self.mean_off + pad_w
            np.subtract(warped, self.mean[:, top:top + size_h, left:left + size_w], out=target,
                        dtype=out.dtype)
        elif self.transformer.mean_value is not None:
            np.subtract(warped, self.transformer.mean_value[:, None, None], out=target, dtype=out.dtype)
        else:
            target[...] = warped
        if self.scale != 1:
            target *= self.scale
