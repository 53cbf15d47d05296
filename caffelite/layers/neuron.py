"""Element-wise neuron layers: ReLU, Sigmoid, TanH, Dropout, PReLU.

All take one bottom and give one top of the same shape (N, ...) and may run
in place (top is bottom). Where the bottom is overwritten, backward reads what
it needs from the top or from a copy kept by forward.
"""
from __future__ import annotations

import numpy as np

from ..fillers import fill
from ..kernels import fused_kernel
from ..proto import pb
from ..registry import register_layer
from .base import TRAIN, Layer, NeuronLayer
from .scale_bias import keep_copy, sum_outer_inner


def _in_place(bottom, top) -> bool:
    return top[0] is bottom[0]


@register_layer("ReLU")
class ReLULayer(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0);  dx = dy * (x > 0 ? 1 : negative_slope).

    Backward reads where x > 0 from the bottom, as Caffe does. In place the
    bottom holds y, which is > 0 exactly where x > 0 for negative_slope >= 0;
    a negative slope flips the sign of y, so then forward keeps the mask.
    """

    param_name = "relu_param"

    def setup(self, bottom, top):
        self.slope = float(self.param.negative_slope)
        self._mask = None

    def forward(self, bottom, top):
        xp, s = self.xp, self.slope
        x, y = bottom[0].data, top[0].data
        if s == 0:
            if xp is np:
                np.maximum(x, 0, out=y)
            else:  # a CuPy ufunc copies an input that is also its output (in place): a kernel
                fused_kernel(xp, "T x", "T y", "y = x < (T)0 ? (T)0 : x", "caffelite_relu_forward")(x, y)
            return
        if s < 0 and _in_place(bottom, top):
            self._mask = x > 0
        if 0 < s <= 1:
            xp.maximum(x, x * s, out=y)  # the leaky ReLU for slopes in (0, 1]
        else:
            _leaky(xp, x, s, y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp, s = self.xp, self.slope
        dy, dx = top[0].diff, bottom[0].diff
        if s == 0 and xp is not np:  # one pass on a GPU: no mask array
            fused_kernel(xp, "T x, T dy", "T dx", "dx = x > (T)0 ? dy : (T)0",
                         "caffelite_relu_backward")(bottom[0].data, dy, dx)
            return
        if s < 0 and _in_place(bottom, top):
            positive = self._mask
        else:
            positive = bottom[0].data > 0
        if s == 0:
            xp.multiply(dy, positive, out=dx)
        else:
            xp.multiply(dy, slope_multiplier(positive, s, dy.dtype), out=dx)


def _leaky(xp, x, slope, y):
    """y = max(x, 0) + slope * min(x, 0); y may be x's memory."""
    negative_part = xp.minimum(x, 0)
    negative_part *= slope
    xp.maximum(x, 0, out=y)
    y += negative_part


def slope_multiplier(positive, slope, dtype):
    """1 where ``positive``, else ``slope`` (a scalar or broadcastable array), exactly.

    Built arithmetically from the mask (slope * not-positive + positive, one
    term always 0): ``where`` with a random mask is several times slower in
    NumPy (branch mispredictions).
    """
    multiplier = (~positive).astype(dtype)
    multiplier *= slope
    multiplier += positive
    return multiplier


@register_layer("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as 0.5 tanh(0.5 x) + 0.5 (Caffe's form: no overflow);
    dx = dy * y * (1 - y)."""

    param_name = "sigmoid_param"

    def forward(self, bottom, top):
        xp = self.xp
        y = top[0].data
        xp.multiply(bottom[0].data, 0.5, out=y)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            # dy * y * (1 - y); dx may be dy's memory (in place), so form it in one expression.
            dx = bottom[0].diff
            dx[...] = top[0].diff * (y * (1 - y))


@register_layer("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x);  dx = dy * (1 - y^2)."""

    param_name = "tanh_param"

    def forward(self, bottom, top):
        self.xp.tanh(bottom[0].data, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * (1 - y * y)


# splitmix64 of seed + i * golden ratio: 24 random bits -> u in [0, 1); kept when u >= ratio.
_DROPOUT = ("unsigned long long z = seed[0] + (unsigned long long)i * 0x9E3779B97F4A7C15ull; "
            "z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull; z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; "
            "z ^= z >> 31; float u = (float)(z >> 40) * (1.0f / 16777216.0f); "
            "multiplier = u >= ratio ? scale : (T)0; y = x * multiplier;")


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """TRAIN: y = x * mask / (1 - r), mask ~ Bernoulli(1 - r) per element (r = dropout_ratio);
    TEST: y = x. Backward applies the same mask and scale.

    On the CPU the mask is drawn from the layer's own NumPy stream ``self.rng``
    (so a snapshot resumes it exactly). On a GPU one kernel hashes a seed drawn
    from ``self.rng`` with each element's index: no host copy per batch, and a
    resumed run still draws the same masks.
    """

    param_name = "dropout_param"

    def setup(self, bottom, top):
        r = float(self.param.dropout_ratio)
        if not 0.0 <= r < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {r}",
                             hint="the fraction of units dropped, e.g. 0.5")
        self.ratio = r
        self.scale = 1.0 / (1.0 - r)
        self._multiplier = None  # mask * scale, kept for backward
        self._seed = None        # on a GPU: this forward's seed, a device scalar

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.phase != TRAIN:
            if not _in_place(bottom, top):
                y[...] = x
            return
        if self.device.is_gpu:
            return self._forward_gpu(x, y)
        uniform = self.rng.random(bottom[0].shape, dtype=self.dtype)
        keep = uniform >= self.ratio  # kept with probability 1 - r
        multiplier = keep.astype(self.dtype)
        multiplier *= self.scale
        self._multiplier = multiplier
        self.xp.multiply(x, self._multiplier, out=y)

    def _forward_gpu(self, x, y) -> None:
        """One kernel: the mask from a counter-based hash of (seed, element index). The seed is
        drawn from ``self.rng`` on the host and passed in a device scalar (no device generator
        state, no host-device sync; a resumed run draws the same masks). Inside a CUDA graph
        capture the seed is left to ``refresh_device_inputs``, which runs before each replay."""
        if self._multiplier is None or self._multiplier.shape != x.shape:
            self._multiplier = self.xp.empty_like(x)
        if self._seed is None:
            self._seed = self.xp.zeros(1, np.uint64)
        if not self.xp.cuda.get_current_stream().is_capturing():
            self.refresh_device_inputs()
        fused_kernel(self.xp, "T x, raw uint64 seed, float32 ratio, T scale", "T y, T multiplier", _DROPOUT,
                     "caffelite_dropout")(x, self._seed, np.float32(self.ratio), self.dtype.type(self.scale),
                                          y, self._multiplier)

    def refresh_device_inputs(self) -> None:
        if self.phase == TRAIN and self._seed is not None:
            self._seed.fill(np.uint64(self.rng.integers(2 ** 63)))  # a kernel argument: no copy, no sync

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.phase != TRAIN:
            if not _in_place(bottom, top):
                dx[...] = dy
            return
        self.xp.multiply(dy, self._multiplier, out=dx)


@register_layer("PReLU")
class PReLULayer(Layer):
    """y_c = max(x, 0) + a_c * min(x, 0), one learned slope a_c per channel (axis 1),
    or a single slope when ``channel_shared``.

    Bottom (N, C, ...) with at least 2 axes; slope blob (C,) or () shared.
    dx = dy * (x > 0 ? 1 : a_c);  da_c += sum over N and space of dy * x * (x <= 0).
    In place, forward keeps a copy of the bottom for backward.
    """

    num_bottom = 1
    num_top = 1
    param_name = "prelu_param"

    def setup(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got {bottom[0].shape}",
                             hint="PReLU learns one slope per channel on axis 1")
        p = self.param
        self.channel_shared = p.channel_shared
        self.channels = bottom[0].shape[1]
        shape = () if self.channel_shared else (self.channels,)
        self.blobs = [self.make_blob(shape, f"{self.name}_slope")]
        filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant", value=0.25)
        fill(self.blobs[0], filler, self.rng)
        self._bottom_copy = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 2 or bottom[0].shape[1] != self.channels:
            raise self.error(f"bottom {bottom[0].shape} does not have the {self.channels} channels "
                             f"(axis 1) the slopes were set up for",
                             hint="PReLU cannot change its channel count after set-up")
        top[0].reshape_like(bottom[0])

    def _slope(self, x):
        """The slopes shaped to broadcast against x (N, C, ...)."""
        a = self.blobs[0].data
        return a if self.channel_shared else a.reshape((1, self.channels) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        xp = self.xp
        x, y = bottom[0].data, top[0].data
        if _in_place(bottom, top):
            self._bottom_copy = keep_copy(self.xp, x, self._bottom_copy)
            x = self._bottom_copy
        _leaky(xp, x, self._slope(x), y)

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        x = self._bottom_copy if _in_place(bottom, top) else bottom[0].data
        dy = top[0].diff
        if self.param_propagate_down[0]:
            negative_part = xp.minimum(x, 0)  # x * (x <= 0)
            per_channel = sum_outer_inner(xp, negative_part.reshape(x.shape[0], self.channels, -1),
                                          dy.reshape(x.shape[0], self.channels, -1))
            slope_diff = self.blobs[0].diff
            slope_diff += per_channel.sum() if self.channel_shared else per_channel
        if propagate_down[0]:
            # In place dx is dy's memory; the slope gradient above has already read dy.
            multiplier = slope_multiplier(x > 0, self._slope(x), dy.dtype)
            xp.multiply(dy, multiplier, out=bottom[0].diff)
