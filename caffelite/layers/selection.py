"""BatchReindex and Filter: pick items (rows along axis 0) of a batch.

BatchReindex  bottoms (data (N, ...), indices (M,)) -> top (M, ...),
              top[i] = data[indices[i]]; indices may repeat or skip items,
              so backward sums: d data[j] = sum over i with indices[i] = j of d top[i].
Filter        bottoms (b_1 .. b_K, selector (N, 1, ...)) -> tops t_1 .. t_K,
              t_k = the items of b_k whose selector value is nonzero, in order;
              backward scatters the top diffs back and zeroes the rest.
Neither gives a gradient to its indices / selector.
"""
from __future__ import annotations

import numpy as np

from ..backend import DEFERRED
from ..errors import DataError
from ..registry import register_layer
from .base import Layer, check_not_in_place


def scatter_add_rows(xp, out, index, rows) -> None:
    """out[index[i]] += rows[i] for every i, repeated indices summed.

    NumPy's ``add.at`` is slow, so on the CPU the rows are sorted by index and
    each run of equal indices summed with one ``add.reduceat``; CuPy's
    ``add.at`` uses atomic adds on the GPU.
    """
    if index.size == 0:
        return
    if xp is not np:
        xp.add.at(out, index, rows)
        return
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    out[ordered[starts]] += np.add.reduceat(rows[order], starts, axis=0)


def integer_indices(layer: Layer, values, limit: int, what: str):
    """``values`` as integer indices, or a DataError naming the layer when one is not
    an integer in [0, limit)."""
    xp = layer.xp
    bad = (values < 0) | (values >= limit) | (xp.floor(values) != values)

    def error(first):
        return DataError(f"({layer.type}) {what} must be integers in [0, {limit}), found {first:g}",
                         layer=layer.name, hint=f"check the values fed to the layer's {what}")

    if xp is not np and DEFERRED.active:
        # Read with the losses at display time (no host round trip per batch); meanwhile the
        # indices are clipped so that nothing reads outside the data.
        flat = bad.reshape(-1)
        DEFERRED.add(flat.any(), (xp.take(values.reshape(-1), xp.argmax(flat)),), error)
        return xp.clip(values, 0, limit - 1).astype(np.int64)
    if bool(bad.any()):
        raise error(float(values.reshape(-1)[xp.flatnonzero(bad.reshape(-1))[0]]))
    return values.astype(np.int64)


@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    num_bottom = 2
    num_top = 1

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise self.error(f"the indices (bottom 1) must be a vector, got shape {bottom[1].shape}",
                             hint="give one index per output item, shape (M,)")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def forward(self, bottom, top):
        self._index = integer_indices(self, bottom[1].data, bottom[0].shape[0], "indices (bottom 1)")
        self.xp.take(bottom[0].data, self._index, axis=0, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            n = bottom[0].shape[0]
            scatter_add_rows(self.xp, dx.reshape(n, -1), self._index,
                             top[0].diff.reshape(self._index.size, -1))
        if propagate_down[1]:
            bottom[1].diff[...] = 0  # the indices have no gradient

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0


@register_layer("Filter")
class FilterLayer(Layer):
    num_bottom = (2, None)
    num_top = (1, None)

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per filtered bottom: {len(bottom) - 1} bottoms "
                             f"(the last bottom is the selector) but {len(top)} tops",
                             hint="list as many tops as bottoms before the selector")
        self._selector_index = len(bottom) - 1
        self._first_reshape = True

    def reshape(self, bottom, top):
        selector = bottom[-1]
        if selector.num_axes < 1 or any(d != 1 for d in selector.shape[1:]):
            raise self.error(f"the selector (last bottom) must be (N,) or (N, 1, ...), "
                             f"got {selector.shape}", hint="one 0/1 value per item")
        n = selector.shape[0]
        for i, b in enumerate(bottom[:-1]):
            if b.num_axes < 1 or b.shape[0] != n:
                raise self.error(f"bottom {i} {b.shape} does not have the selector's {n} items",
                                 hint="every bottom needs the selector's first dimension")
        self._index = self.xp.flatnonzero(selector.data.reshape(-1))
        # Like Caffe, set-up sizes the tops for the whole batch: the selector is not filled yet.
        kept = n if self._first_reshape else int(self._index.size)
        self._first_reshape = False
        for b, t in zip(bottom, top):
            t.reshape((kept,) + b.shape[1:])

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            self.xp.take(b.data, self._index, axis=0, out=t.data)

    def backward(self, top, propagate_down, bottom):
        for i, t in enumerate(top):
            if propagate_down[i]:
                dx = bottom[i].diff
                dx[...] = 0
                dx[self._index] = t.diff
        if propagate_down[self._selector_index]:
            bottom[-1].diff[...] = 0  # the selection has no gradient

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self._selector_index
