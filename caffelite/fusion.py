"""BatchNorm followed by an in-place Scale, computed as one layer on a GPU.

Caffe's BatchNorm has no learned scale and shift, so nets write each batch normalisation as
BatchNorm, then Scale with ``bias_term``, both in place on the convolution's output (ResNet:
53 pairs). Run as written, the pair moves its activations through memory 16 times per
training iteration; fused, 9 times::

    forward    BatchNorm writes y = x^ * s + b itself (keeping x^ for backward, as it does
               anyway); Scale's forward does nothing
    backward   Scale sums dy and dy * x^ per channel (its ds and db, as always) and leaves dx to
               BatchNorm, which takes its own sums from these (its top diff would be s * dy, so
               E[s dy] = s E[dy] and E[s dy x^] = s E[dy x^]) and writes, in one pass,
               dx = s * (dy - E[dy] - x^ E[dy x^]) / sqrt(var + eps)

The layers, their parameters, snapshots and outputs stay as they were; only the blob between
the two differs, and no layer can read it there: Scale works in place on BatchNorm's top, so
nothing else sees BatchNorm's own output. Results equal the unfused pair's up to rounding.

A pair is fused when the net runs on a GPU, BatchNorm is followed directly by a Scale with one
bottom (a learned scale) over the channel axis (axis 1, num_axes 1) that works in place on
BatchNorm's top, and, with global statistics (TEST), Scale needs no backward (ds needs x^,
which BatchNorm keeps only in TRAIN). debug_info, which logs every layer's output, unfuses
(``unfuse``); ``CAFFELITE_FUSE=0`` turns fusion off.
"""
from __future__ import annotations

import os


def _enabled() -> bool:
    return os.environ.get("CAFFELITE_FUSE", "1").strip() not in ("0", "", "false", "no")


def fusable(net, i: int) -> bool:
    """Whether layers i (BatchNorm) and i + 1 (Scale) of ``net`` can run fused (module doc)."""
    if i + 1 >= len(net.layers):
        return False
    bn, scale = net.layers[i], net.layers[i + 1]
    if bn.type != "BatchNorm" or scale.type != "Scale" or len(net.bottom_vecs[i + 1]) != 1:
        return False
    p = scale.param
    in_place = net.bottom_vecs[i + 1][0] is net.top_vecs[i][0] is net.top_vecs[i + 1][0]
    channel_axis = net.top_vecs[i][0].num_axes > 1 and p.axis in (1, 1 - net.top_vecs[i][0].num_axes)
    needs_x_norm = net.layer_need_backward[i + 1] and bn.use_global_stats
    return in_place and channel_axis and p.num_axes == 1 and not needs_x_norm


def fuse(net) -> int:
    """Fuse every BatchNorm + Scale pair of a GPU ``net`` (module doc); returns how many."""
    if not (net.ctx.device.is_gpu and _enabled()):
        return 0
    count = 0
    for i in range(len(net.layers) - 1):
        if fusable(net, i):
            net.layers[i].fused_scale = net.layers[i + 1]
            net.layers[i + 1].fused_into = net.layers[i]
            count += 1
    return count


def unfuse(net) -> None:
    """Run every layer on its own again (debug_info shows each layer's output)."""
    for layer in net.layers:
        if getattr(layer, "fused_scale", None) is not None:
            layer.fused_scale.fused_into = None
            layer.fused_scale = None


__all__ = ["fusable", "fuse", "unfuse"]
