"""BatchNorm: normalise each channel to zero mean and unit variance (no learned scale/shift).

Bottom and top (N, C, ...) or (N, C) (a 1-axis bottom is one channel); the
statistics of channel c run over N and all spatial positions, m = count / C
values. Three blobs, never learned (lr 0, no gradient): running mean sum (C,),
running variance sum (C,) and the scale factor (1,) they are divided by.

TRAIN (use_global_stats false, the default in TRAIN)::

    mean = E[x], var = E[(x - mean)^2]            (biased, for normalising)
    y = (x - mean) / sqrt(var + eps)
    factor = factor * maf + 1;  mean_sum = mean_sum * maf + mean
    var_sum = var_sum * maf + m / (m - 1) * var   (m / (m - 1) is 1 when m == 1)
    dx = (dy - E[dy] - y * E[dy * y]) / sqrt(var + eps)

Global stats (the default in TEST): mean = mean_sum / factor, var = var_sum / factor
(both 0 while factor is 0), y = (x - mean) / sqrt(var + eps), dx = dy / sqrt(var + eps).
Runs in place (top is bottom); E[] is over N and space per channel.
"""
from __future__ import annotations

import numpy as np

from ..kernels.channel import NULL, ChannelOps
from ..registry import register_layer
from .base import TEST, Layer
from .scale_bias import keep_copy, sum_outer_inner


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "batch_norm_param"
    #: The in-place Scale layer after this one that it computes with on a GPU (fusion.py).
    fused_scale = None

    def setup(self, bottom, top):
        p = self.param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        self.maf = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        self.blobs = [self.make_blob((self.channels,), f"{self.name}_mean"),
                      self.make_blob((self.channels,), f"{self.name}_variance"),
                      self.make_blob((1,), f"{self.name}_scale_factor")]
        for blob in self.blobs:
            blob.set_data(0)
        # Running statistics, not parameters: as Caffe, pin their lr_mult (and decay_mult)
        # to 0 in the layer's own ParamSpecs, which the net reads after set-up.
        specs = self.layer_param.param
        for i in range(3):
            if i >= len(specs):
                specs.add(lr_mult=0, decay_mult=0)
            elif specs[i].lr_mult != 0:
                raise self.error("cannot train the batch statistics (param lr_mult must be 0)",
                                 hint="remove the layer's param entries, or set lr_mult: 0; "
                                      "add a Scale layer with bias_term: true for a learned scale and shift")
        self.param_propagate_down = [False] * 3
        self.inv_std = None  # (C,), kept for backward
        self.x_norm = None   # (N, C, S) normalised top, kept for backward in TRAIN
        self._gpu = None     # kernels/channel.py on a GPU: one reduction and one map per pass

    def reshape(self, bottom, top):
        channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        if channels != self.channels:
            raise self.error(f"bottom {bottom[0].shape} has {channels} channels, "
                             f"the statistics were set up for {self.channels}",
                             hint="BatchNorm cannot change its channel count after set-up")
        top[0].reshape_like(bottom[0])

    def _view(self, array):
        """array as (N, C, S): S = spatial count (1 for (N, C) bottoms)."""
        n = array.shape[0] if array.ndim > 1 else array.size
        return array.reshape(n, self.channels, -1)

    def _dims(self, blob) -> tuple:
        n = blob.shape[0] if blob.num_axes > 1 else blob.count
        return n, self.channels, blob.count // max(n * self.channels, 1)

    def _gpu_ops(self):
        if self._gpu is None:
            self._gpu = ChannelOps(self.dtype)
        return self._gpu

    def forward(self, bottom, top):
        if self.device.is_gpu:
            return self._forward_gpu(bottom[0], top[0])
        xp = self.xp
        x = self._view(bottom[0].data)
        y = self._view(top[0].data)
        if self.use_global_stats:
            # 1 / factor, or 0 while factor is 0, computed where the factor lives (on a GPU a
            # host read would wait for the device every forward).
            factor = self.blobs[2].data
            nonzero = factor != 0
            inv = nonzero / (factor + ~nonzero)
            mean = self.blobs[0].data * inv
            var = self.blobs[1].data * inv
        else:
            m = x.shape[0] * x.shape[2]
            mean = sum_outer_inner(xp, x) / m
        xp.subtract(x, mean[:, None], out=y)
        if not self.use_global_stats:
            var = sum_outer_inner(xp, y, y) / m
            self._update_stats(mean, var, m)
        inv_std = var + self.eps
        xp.sqrt(inv_std, out=inv_std)
        xp.reciprocal(inv_std, out=inv_std)
        self.inv_std = inv_std
        y *= inv_std[:, None]
        if not self.use_global_stats:
            # Later in-place layers (Scale, ReLU) overwrite the top: keep y for backward.
            self.x_norm = keep_copy(xp, y, self.x_norm)

    def _update_stats(self, mean, var, m: int):
        maf = self.maf
        stats = self.blobs
        factor = stats[2].data
        factor *= maf
        factor += 1
        stats[0].data[...] = stats[0].data * maf + mean
        correction = m / (m - 1) if m > 1 else 1.0
        stats[1].data[...] = stats[1].data * maf + var * correction

    def _forward_gpu(self, bottom, top) -> None:
        """The module doc's formulas in three kernels (statistics in float32 for float16 and
        bfloat16: their sums would overflow): partial sums, statistics, normalisation."""
        ops = self._gpu_ops()
        outer, dim, inner = dims = self._dims(bottom)
        x, y = bottom.data, top.data
        mean, inv_std = ops.buffer("mean", (dim,)), ops.buffer("inv_std", (dim,))
        mean_sum, var_sum, factor = (blob.data for blob in self.blobs)
        if self.use_global_stats:
            ops.per_channel("bn_global_stats", dim, (mean_sum, var_sum, factor, np.int32(dim),
                                                     ops.scalar(self.eps), mean, inv_std))
            keep = NULL
        else:
            m = outer * inner
            partial = ops.partial_sums(x, NULL, dims, shift=True)
            ops.per_channel("bn_batch_stats", dim, (
                partial, np.int32(dim), np.int32(ops.parts), x, np.int64(inner), ops.scalar(m),
                ops.scalar(self.eps), ops.scalar(self.maf), ops.scalar(m / (m - 1) if m > 1 else 1.0),
                mean_sum, var_sum, factor, mean, inv_std))
            if self.x_norm is None or self.x_norm.shape != x.shape:
                self.x_norm = self.xp.empty_like(x)
            keep = self.x_norm
        self.inv_std = inv_std
        scale, bias = NULL, NULL
        if self.fused_scale is not None:  # y = xn * s + b: the Scale's forward (fusion.py)
            scale, bias = self.fused_scale.scale_and_bias()
        ops.elementwise("bn_normalize", x.size, (x, mean, inv_std, np.int64(x.size), np.int32(dim),
                                                 np.int64(inner), y, keep, scale, bias))

    def _backward_gpu(self, top, bottom) -> None:
        ops = self._gpu_ops()
        outer, dim, inner = dims = self._dims(bottom)
        dy, dx = top.diff, bottom.diff
        fused = self.fused_scale
        if self.use_global_stats:
            means = NULL
        else:
            # Fused: the Scale's backward summed dy and dy * xn already (fusion.py).
            partial, parts = (fused.sums if fused is not None else
                              (ops.partial_sums(dy, self.x_norm, dims, shift=False), ops.parts))
            means = ops.buffer("means", (2, dim))
            ops.per_channel("channel_means", dim, (partial, np.int32(dim), np.int32(parts),
                                                   ops.scalar(1.0 / (outer * inner)), means))
        ops.elementwise("bn_backward", dy.size, (dy, self.x_norm if self.x_norm is not None else NULL,
                                                 means, self.inv_std, np.int64(dy.size), np.int32(dim),
                                                 np.int64(inner), dx,
                                                 fused.blobs[0].data if fused is not None else NULL))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.device.is_gpu:
            return self._backward_gpu(top[0], bottom[0])
        xp = self.xp
        dy = self._view(top[0].diff)
        dx = self._view(bottom[0].diff)
        inv_std = self.inv_std[:, None]
        if self.use_global_stats:
            xp.multiply(dy, inv_std, out=dx)
            return
        y = self.x_norm
        m = dy.shape[0] * dy.shape[2]
        mean_dy = sum_outer_inner(xp, dy) / m
        mean_dy_y = sum_outer_inner(xp, dy, y) / m
        # dx may share dy's memory (in place): the means above are taken first.
        tmp = y * (mean_dy_y * self.inv_std)[:, None]
        xp.multiply(dy, inv_std, out=dx)
        dx -= tmp
        dx -= (mean_dy * self.inv_std)[:, None]
