"""SPP (``spp_param``): spatial pyramid pooling, a fixed-length output for any H x W.

Bottom (N, C, H, W). Level l = 0 .. pyramid_height-1 pools into 2^l x 2^l
bins with Caffe's Pooling (MAX, AVE or STOCHASTIC) set up as::

    bins = 2^l;  kernel = ceil(H / bins);  pad = (kernel * bins - H + 1) // 2;  stride = kernel

(the same along W). Each level's (N, C, h_l, w_l) output is flattened and the
levels are concatenated, level 0 first: top (N, C * sum_l h_l * w_l), which is
(N, C * (4^L - 1) / 3) when every level gives bins x bins. With
pyramid_height 1 the top is the single pooling's (N, C, 1, 1), as in Caffe.
Backward sums the levels' gradients into the bottom.
"""
from __future__ import annotations

from ..blob import Blob
from ..errors import ConfigError
from ..proto import pb
from ..registry import register_layer
from .base import Layer, check_not_in_place
from .pooling import PoolingLayer


def pooling_param_for_level(level: int, height: int, width: int, pool: int) -> "pb.PoolingParameter":
    """Caffe's SPP pooling settings for ``level`` of an H x W bottom."""
    bins = 2 ** level
    kernel_h, kernel_w = -(-height // bins), -(-width // bins)
    pad_h = (kernel_h * bins - height + 1) // 2
    pad_w = (kernel_w * bins - width + 1) // 2
    return pb.PoolingParameter(pool=pool, kernel_h=kernel_h, kernel_w=kernel_w, pad_h=pad_h,
                               pad_w=pad_w, stride_h=kernel_h, stride_w=kernel_w)


@register_layer("SPP")
class SPPLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "spp_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        self.height = int(self.param.pyramid_height)
        if self.height < 1:
            raise self.error(f"pyramid_height must be at least 1, got {self.height}",
                             hint="e.g. spp_param: {pyramid_height: 3}")
        self._spatial = None
        self.pools: list[PoolingLayer] = []
        self.pooled = [Blob((), self.dtype, self.device, name=f"{self.name}_level{i}")
                       for i in range(self.height)]
        # Sees the bottom's data with a diff of its own, so levels after the first can add up.
        self._grad = Blob((), self.dtype, self.device, name=f"{self.name}_grad")

    def _build(self, bottom, top) -> None:
        """One Pooling layer per level for the bottom's H x W (rebuilt when it changes)."""
        _, _, h, w = bottom[0].shape
        if h <= 0 or w <= 0:
            raise self.error(f"input dimensions cannot be zero, got {bottom[0].shape}",
                             hint="SPP needs a non-empty image")
        self._spatial = (h, w)
        self.pools = []
        for level in range(self.height):
            lp = pb.LayerParameter(name=f"{self.name}_pool{level}", type="Pooling")
            lp.pooling_param.CopyFrom(pooling_param_for_level(level, h, w, self.param.pool))
            if self.layer_param.HasField("phase"):
                lp.phase = self.layer_param.phase
            pool = PoolingLayer(lp, self.ctx)
            try:
                pool.layer_setup(bottom, [self.pooled[level]] if self.height > 1 else top)
            except ConfigError as exc:
                raise self.error(f"level {level} ({2 ** level} x {2 ** level} bins) cannot pool a "
                                 f"{h} x {w} input: {exc.message}",
                                 hint="lower pyramid_height or feed a larger image") from None
            self.pools.append(pool)

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), "
                             f"got {bottom[0].shape}", hint="reshape the input to N x C x H x W")
        if bottom[0].shape[2:] != self._spatial:
            self._build(bottom, top)
        if self.height == 1:
            self.pools[0].reshape(bottom, top)
            return
        self.sizes = []
        for pool, out in zip(self.pools, self.pooled):
            pool.reshape(bottom, [out])
            self.sizes.append(out.count_range(1))
        top[0].reshape((bottom[0].shape[0], sum(self.sizes)))

    def _level_slices(self):
        start = 0
        for size in self.sizes:
            yield slice(start, start + size)
            start += size

    def forward(self, bottom, top):
        if self.height == 1:
            self.pools[0].forward(bottom, top)
            return
        y = top[0].data
        for pool, out, cols in zip(self.pools, self.pooled, self._level_slices()):
            pool.forward(bottom, [out])
            y[:, cols] = out.data.reshape(y.shape[0], -1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.height == 1:
            self.pools[0].backward(top, propagate_down, bottom)
            return
        dy = top[0].diff
        grad = self._grad
        grad.reshape(bottom[0].shape)
        grad.share_data(bottom[0])
        for level, (pool, out, cols) in enumerate(zip(self.pools, self.pooled, self._level_slices())):
            out.diff[...] = dy[:, cols].reshape(out.shape)
            if level == 0:
                pool.backward([out], [True], bottom)
            else:
                pool.backward([out], [True], [grad])
                dx = bottom[0].diff
                dx += grad.diff
