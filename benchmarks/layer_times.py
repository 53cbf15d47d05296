"""Per-layer forward / backward times of a caffelite Net (as ``caffelite time``)."""
from __future__ import annotations

import statistics
import time


def layer_times(net, iters: int = 5) -> list[tuple[str, str, float, float]]:
    """(name, type, median forward ms, median backward ms) per layer, each layer timed alone."""
    n = len(net.layers)
    fwd = [[] for _ in range(n)]
    bwd = [[] for _ in range(n)]
    for _ in range(iters):
        net.clear_param_diffs()
        for i, layer in enumerate(net.layers):
            t0 = time.perf_counter()
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            fwd[i].append(time.perf_counter() - t0)
        for entry in net._loss_tops:  # (.., blob, weight): what Net.backward starts from
            entry[-2].diff[...] = entry[-1]
        for i in reversed(range(n)):
            t0 = time.perf_counter()
            if net.layer_need_backward[i]:
                net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            bwd[i].append(time.perf_counter() - t0)
    return [(name, layer.type, statistics.median(f) * 1e3, statistics.median(b) * 1e3)
            for name, layer, f, b in zip(net.layer_names, net.layers, fwd, bwd)]


def format_table(rows, title: str = "") -> str:
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines.append(f"  {'layer':<{width}}  {'type':<16} {'forward ms':>11} {'backward ms':>12} {'share':>6}")
    total = sum(r[2] + r[3] for r in rows) or 1.0
    for name, kind, f, b in rows:
        lines.append(f"  {name:<{width}}  {kind:<16} {f:11.2f} {b:12.2f} {100 * (f + b) / total:5.1f}%")
    lines.append(f"  {'total':<{width}}  {'':<16} {sum(r[2] for r in rows):11.2f} "
                 f"{sum(r[3] for r in rows):12.2f}")
    return "\n".join(lines)
