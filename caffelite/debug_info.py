"""Caffe's ``debug_info``: the mean absolute value of every blob, layer by layer.

Attached to a Net through its ``after_forward`` / ``after_backward`` hooks, it
logs the lines Caffe prints with ``debug_info: true``::

        [Forward] Layer conv1, top blob conv1 data: 0.0432
        [Backward] Layer conv1, param blob 0 diff: 0.00121
"""
from __future__ import annotations

import logging

from . import fusion
from .log import g
from .net import Net

log = logging.getLogger("caffelite")


def _mean_abs(array) -> float:
    return float(abs(array).mean()) if array.size else 0.0


def attach(net: Net) -> None:
    """Log Caffe's per-layer debug lines for every forward and backward of ``net``."""

    def after_forward(i: int) -> None:
        name = net.layer_names[i]
        for blob_name, blob in zip(net.top_ids[i], net.top_vecs[i]):
            log.info("    [Forward] Layer %s, top blob %s data: %s", name, blob_name, g(_mean_abs(blob.data)))
        for j, blob in enumerate(net.layers[i].blobs):
            log.info("    [Forward] Layer %s, param blob %d data: %s", name, j, g(_mean_abs(blob.data)))

    def after_backward(i: int) -> None:
        name = net.layer_names[i]
        for blob_name, blob, need in zip(net.bottom_ids[i], net.bottom_vecs[i], net.bottom_need_backward[i]):
            if need:
                log.info("    [Backward] Layer %s, bottom blob %s diff: %s", name, blob_name, g(_mean_abs(blob.diff)))
        for j, blob in enumerate(net.layers[i].blobs):
            if net.layers[i].param_propagate_down[j]:
                log.info("    [Backward] Layer %s, param blob %d diff: %s", name, j, g(_mean_abs(blob.diff)))

    fusion.unfuse(net)  # each layer's own output is logged
    net.after_forward.append(after_forward)
    net.after_backward.append(after_backward)
