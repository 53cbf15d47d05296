"""ImageData: images named in a list file, decoded by the data workers.

Each line of ``image_data_param.source`` is ``path label`` (split at the last
space, so paths may contain spaces). A path is taken under ``root_folder``
when one is set, else beside the list file (or in the current directory, as
Caffe does, when the images are found there).

Images are read as OpenCV's imread does: 3 channels BGR with ``is_color``
(grey files are expanded), else 1 grey channel; then resized to
``new_height`` x ``new_width`` (both or neither) with OpenCV's INTER_LINEAR;
then transform_param applies. Tops: data (batch_size, C, H, W) shaped from
each batch's first image, and label (batch_size,).

The images form an endless stream: epoch e visits every line once, in file
order, or with ``shuffle`` in a permutation drawn from (seed, epoch), so any
stream position maps to a line without replaying the past (exact resume).
``rand_skip`` starts a random number of lines in; rank r of N reads
positions r, r + N, ... (TRAIN).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..data.datum import decode_image
from ..data.resize import resize_chw as resize_linear
from ..data.transform import DataTransformer, check_item_shape, merged_transform_param
from ..errors import DataError
from ..registry import register_layer
from .prefetching_layer import PrefetchingDataLayer, decode_planar

LIST_HINT = "each line of an ImageData list is 'path label', e.g. 'cats/001.jpg 3'"
PREFETCH = 4  # Caffe's default prefetch count (DataParameter.prefetch)


def read_image_list(source: str) -> list[tuple[str, int, int]]:
    """(path, label, line number) for every non-blank line of ``source``."""
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"image list file '{source}' does not exist", hint=LIST_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read image list file '{source}': {exc}", hint=LIST_HINT) from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        path, space, label = line.rpartition(" ")
        if not space or not path.strip():
            raise DataError(f"'{line}' is not 'path label'", file=source, line=number, hint=LIST_HINT)
        try:
            lines.append((path.rstrip(), int(label), number))
        except ValueError:
            raise DataError(f"label '{label}' of '{path.rstrip()}' is not an integer",
                            file=source, line=number, hint=LIST_HINT) from None
    if not lines:
        raise DataError(f"image list file '{source}' names no images", hint=LIST_HINT)
    return lines


@register_layer("ImageData")
class ImageDataLayer(PrefetchingDataLayer):
    """Images and labels from a list file; see the module docstring."""

    param_name = "image_data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("image_data_param.source is not set",
                             hint="give a list file of 'path label' lines")
        self.batch_size = self._check_batch_size(p.batch_size, "image_data_param.batch_size")
        self.new_size = (int(p.new_height), int(p.new_width))
        if (self.new_size[0] > 0) != (self.new_size[1] > 0):
            raise self.error("new_height and new_width must be set together",
                             hint="give both (resize) or neither (keep the image size)")
        self.transformer = DataTransformer(merged_transform_param(self.layer_param, "image_data_param"),
                                           self.phase, self.dtype, layer=self.name)
        self.is_color = bool(p.is_color)
        self.source = p.source
        self.lines = read_image_list(p.source)
        self.root = self._find_root(p.root_folder)
        self.shuffle = bool(p.shuffle)
        self._perms: dict[int, np.ndarray] = {}
        self._perms_lock = threading.Lock()
        self._init_stream()
        # Every rank must walk the same permutation to take its own slice of it: the solver
        # seeds rank r with seed + r, so the shuffle uses the rank-0 seed.
        self._shuffle_seed = self._seed - self.ctx.rank
        self._skip = int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0
        first = self.read_image(self.line_at(self._position(0, 0)))
        out_shape = self.transformer.output_shape(first.shape)
        top[0].reshape((self.batch_size,) + out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_prefetch(PREFETCH)

    def _find_root(self, root_folder: str) -> str:
        if root_folder:
            return root_folder
        beside = os.path.dirname(os.path.abspath(self.source))
        path = self.lines[0][0]
        if not os.path.exists(os.path.join(beside, path)) and os.path.exists(path):
            return ""  # Caffe's rule: relative to the current directory
        return beside

    # ---- stream positions -> lines ---------------------------------------------------
    def _position(self, index: int, item: int) -> int:
        return self._skip + (index * self.batch_size + item) * self._world + self._rank

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        with self._perms_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self._shuffle_seed, self.ctx.net_key & 0xFFFFFFFF,
                                             self._key, epoch])
                perm = rng.permutation(len(self.lines))
                if len(self._perms) > 3:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
        return perm

    def line_at(self, position: int) -> tuple[str, int, int]:
        epoch, within = divmod(position, len(self.lines))
        order = self._order(epoch)
        return self.lines[int(order[within]) if order is not None else within]

    # ---- reading ------------------------------------------------------------------
    def read_image(self, line: tuple[str, int, int]) -> np.ndarray:
        """One list line's image, C x H x W uint8 BGR (or grey), resized when asked."""
        path, _, number = line
        full = os.path.join(self.root, path) if self.root else path
        try:
            with open(full, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DataError(f"cannot read image '{full}': {exc.strerror or exc}", file=self.source,
                            line=number, hint="check the path and root_folder") from None
        try:
            if self.is_color:
                image = decode_planar(data, True, False, path, self.source)
            else:
                image = decode_image(data, False, True, path, self.source)
        except DataError as exc:
            raise DataError(f"cannot decode image '{full}' ({exc.message})", file=self.source,
                            line=number, hint="the file is corrupt or not an image") from None
        if self.new_size[0] > 0:
            image = resize_linear(image, *self.new_size)
        return image

    def load_batch(self, index: int, batch) -> None:
        """Read, decode, resize and transform batch ``index`` (runs in a worker thread)."""
        n = self.batch_size
        lines = [self.line_at(self._position(index, i)) for i in range(n)]
        items = []
        for line in lines:
            image = self.read_image(line)
            if items:
                check_item_shape(image.shape, items[0].shape,
                                 f"image '{line[0]}' ({self.source}:{line[2]})")
            items.append(image)
        out = batch.array("data", (n,) + self.transformer.output_shape(items[0].shape), self.dtype)
        rng = self.batch_rng(index) if self.transformer.is_random else None
        self.transformer(items, rng, out)
        batch.array("label", (n,), self.dtype)[...] = [label for _, label, _ in lines]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skip": self._skip}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("skip", self._skip))
        self._shuffle_seed = int(state.get("seed", self._seed)) - self.ctx.rank
        with self._perms_lock:
            self._perms.clear()
        super().load_state_dict(state)
