"""A net at a glance: its layers, top shapes, parameter counts and memory, as log lines.

::

    Net 'LeNet' (TRAIN): 9 layers, 431080 parameters (1.64 MB), about 12.4 MB for data and diffs
      layer     type                 top shapes               params
      mnist     Data                 data 64x1x28x28          0
                                     label 64
      conv1     Convolution          conv1 64x20x24x24        520
      ...

The memory estimate counts every distinct blob (in-place tops once) and every
parameter blob owned by its layer, data and diff, in the net's dtype; layer
workspaces (im2col buffers, cuDNN) come on top.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MB = float(1 << 20)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _owned_param_counts(net) -> list[int]:
    """Parameters per layer, shared blobs counted once (by their owner)."""
    from .io.weights import layer_param_owned  # noqa: PLC0415 - io imports net

    owned = layer_param_owned(net)
    return [sum(b.count for b, own in zip(layer.blobs, owned[name]) if own)
            for name, layer in zip(net.layer_names, net.layers)]


def net_summary(net) -> dict:
    """Numbers of the summary: layers, parameters, bytes of blobs and parameters (data + diff)."""
    itemsize = net.ctx.dtype.itemsize
    params = _owned_param_counts(net)
    blob_values = sum(blob.count for blob in net.blobs.values())
    n_params = sum(params)
    return {
        "name": net.name,
        "phase": "TRAIN" if net.phase == 0 else "TEST",
        "layers": len(net.layers),
        "params": n_params,
        "param_bytes": n_params * itemsize,
        "blob_bytes": 2 * blob_values * itemsize,
        "memory_bytes": 2 * (blob_values + n_params) * itemsize,
        "per_layer": params,
    }


def summary_lines(net, table: bool = True) -> list[str]:
    """The summary as text lines (a header, then one or more lines per layer)."""
    info = net_summary(net)
    lines = [f"Net '{info['name']}' ({info['phase']}): {info['layers']} layers, {info['params']} "
             f"parameters ({info['param_bytes'] / MB:.2f} MB), about {info['memory_bytes'] / MB:.1f} MB "
             f"for data and diffs ({net.ctx.dtype.name})"]
    if not table:
        return lines
    rows = [("layer", "type", "top shapes", "params")]
    for i, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        tops = [f"{top} {_shape(blob.shape)}" for top, blob in zip(net.top_ids[i], net.top_vecs[i])]
        rows.append((name, layer.type, tops[0] if tops else "-", str(info["per_layer"][i])))
        rows.extend(("", "", extra, "") for extra in tops[1:])
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return lines


def log_summary(net, table: bool = True, logger: logging.Logger | None = None) -> None:
    for line in summary_lines(net, table):
        (logger or log).info("%s", line)


__all__ = ["net_summary", "summary_lines", "log_summary"]
