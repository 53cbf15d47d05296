"""Tile (``tile_param``): ``tiles`` copies of the bottom laid end to end along ``axis``.

Bottom (..., D, ...) with D at axis a -> top (..., tiles * D, ...), like
numpy.tile along that axis: top[..., t * D + d, ...] = x[..., d, ...].
Viewing the bottom as (outer, inner) with outer = count(:a), inner = count(a:),
the top is (outer, tiles, inner) and backward sums over the tiles.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer, check_not_in_place


@register_layer("Tile")
class TileLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "tile_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        if not self.param.HasField("tiles"):
            raise self.error("the number of tiles must be given", hint="e.g. tile_param: {tiles: 2}")
        self.tiles = int(self.param.tiles)
        if self.tiles < 1:
            raise self.error(f"tiles must be positive, got {self.tiles}", hint="e.g. tiles: 2")

    def reshape(self, bottom, top):
        b = bottom[0]
        try:
            axis = b.canonical_axis(self.param.axis)
        except ConfigError:
            raise self.error(f"axis {self.param.axis} is out of range for bottom {b.shape}",
                             hint=f"use an axis in [-{b.num_axes}, {b.num_axes})") from None
        shape = list(b.shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)
        self.outer, self.inner = b.count_range(0, axis), b.count_range(axis)

    def forward(self, bottom, top):
        y = top[0].data.reshape(self.outer, self.tiles, self.inner)
        y[...] = bottom[0].data.reshape(self.outer, 1, self.inner)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            dy.sum(axis=1, out=bottom[0].diff.reshape(self.outer, self.inner))
