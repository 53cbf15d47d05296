"""MVN: mean-variance normalisation of each item's channels (or whole item).

Bottom and top (N, C, ...). Each row of the view (R, D) is normalised on its
own: R = N * C and D = H * W by default, R = N and D = C * H * W with
``across_channels``. Per row, with z = x - mean(x) and s = sqrt(mean(z^2))::

    y = z                      (normalize_variance false)
    y = z / (s + eps)          (Caffe adds eps to the standard deviation)

Backward (g = dy, means per row)::

    dx = g - mean(g)                                        (no variance)
    dx = (g - mean(g) - mean(g y) * z / s) / (s + eps)      (variance)

The second is the exact derivative. Caffe writes y where this has z / s,
which differs by the factor (s + eps) / s, a relative 1e-9 at the default
eps; a row with s == 0 has z == 0 and gets dx = (g - mean(g)) / eps in both.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer


@register_layer("MVN")
class MVNLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "mvn_param"

    def setup(self, bottom, top):
        p = self.param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = float(p.eps)
        self.std = None  # (R, 1) sqrt of the variance, kept for backward

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2 and not self.across_channels:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got {shape}",
                             hint="set across_channels: true to normalise each item as a whole")
        rows = shape[0] if self.across_channels else shape[0] * shape[1]
        self.rows = (rows, bottom[0].count // max(rows, 1))
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.rows)
        y = top[0].data.reshape(self.rows)
        d = self.rows[1]
        # einsum: no temporary for products, and faster than sum(axis=1) in NumPy.
        mean = xp.einsum("rd->r", x)[:, None]
        mean /= d
        xp.subtract(x, mean, out=y)
        if not self.normalize_variance:
            return
        var = xp.einsum("rd,rd->r", y, y)[:, None]
        var /= d
        self.std = xp.sqrt(var, out=var)
        y /= self.std + self.eps

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        g = top[0].diff.reshape(self.rows)
        dx = bottom[0].diff.reshape(self.rows)  # may be g's memory (in place)
        d = self.rows[1]
        mean_g = xp.einsum("rd->r", g)[:, None]
        mean_g /= d
        if not self.normalize_variance:
            xp.subtract(g, mean_g, out=dx)
            return
        y = top[0].data.reshape(self.rows)
        std_eps = self.std + self.eps
        mean_gy = xp.einsum("rd,rd->r", g, y)[:, None]
        mean_gy /= d
        # z / s = y (s + eps) / s; rows with s == 0 have y == 0, where the factor is moot.
        factor = mean_gy * xp.where(self.std > 0, std_eps / xp.where(self.std > 0, self.std, 1), 0)
        tmp = y * factor
        xp.subtract(g, tmp, out=dx)
        dx -= mean_g
        dx /= std_eps
