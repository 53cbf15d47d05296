"""``caffelite draw_net``: a picture of a net's layer graph as SVG (no Graphviz needed).

    caffelite draw_net NET OUT.svg [--phase TRAIN|TEST|ALL] [--rankdir TB|LR]

Layers are boxes (name, type and the main settings), blobs are ellipses, and
edges run from bottoms to layers to tops. A layer that writes its top in place
gets a new ellipse for the updated blob, so the picture is a DAG. Layout: each
node sits one rank below the deepest of its inputs; nodes in a rank keep the
net's order, then are sorted once by the mean position of their inputs, which
untangles most Caffe nets. ``--phase ALL`` (the default, as Caffe's
draw_net.py) keeps every layer; layers of both phases writing the same top
share its ellipse.
"""
from __future__ import annotations

import os
from xml.sax.saxutils import escape

from ..cli import _flag
from ..errors import ConfigError

COMMAND = "draw_net"
HELP = "draw a net's layer graph as an SVG picture"

CHAR_W, LINE_H = 7.0, 15.0
GAP_RANK, GAP_NODE, PAD = 46.0, 24.0, 20.0
LAYER_FILL = {"Convolution": "#f7c9a4", "Deconvolution": "#f7c9a4", "Pooling": "#b9d8f0",
              "InnerProduct": "#f2a7a7", "ReLU": "#c9e6b4", "Data": "#e3d3f0", "Input": "#e3d3f0"}


def add_arguments(parser) -> None:
    parser.add_argument("net", metavar="NET", help="net file (.yaml or .prototxt)")
    parser.add_argument("out", metavar="OUT.svg", help="the SVG file to write")
    _flag(parser, "phase", choices=("TRAIN", "TEST", "ALL"), default="ALL",
          help="draw the layers of this phase only (default: all)")
    _flag(parser, "rankdir", choices=("TB", "LR"), default="TB", help="top-to-bottom or left-to-right")


def _details(lp) -> list[str]:
    """One short line of the settings that matter most for a layer's shape."""
    out = []
    if lp.type in ("Convolution", "Deconvolution"):
        p = lp.convolution_param
        k = "x".join(map(str, p.kernel_size)) or f"{p.kernel_h}x{p.kernel_w}"
        out.append(f"{p.num_output} out, kernel {k}" + (f", stride {p.stride[0]}" if len(p.stride) else ""))
    elif lp.type == "Pooling":
        p = lp.pooling_param
        kind = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
        out.append(f"{kind} {p.kernel_size or p.kernel_h}" + (f", stride {p.stride}" if p.stride > 1 else ""))
    elif lp.type == "InnerProduct":
        out.append(f"{lp.inner_product_param.num_output} out")
    return out


class Graph:
    """Nodes (layers and blobs) with ranks, and edges, built from a NetParameter."""

    def __init__(self, param, phase: str = "ALL"):
        from ..net_state import filter_net, make_state  # noqa: PLC0415
        from ..upgrade import upgrade_net  # noqa: PLC0415

        param = upgrade_net(param, None)
        if phase != "ALL":
            param = filter_net(param, make_state(0 if phase == "TRAIN" else 1))
        self.nodes: list[dict] = []
        self.edges: list[tuple[int, int]] = []
        current: dict[str, int] = {}  # blob name -> node id of its latest version
        for lp in param.layer:
            lines = [lp.name, f"({lp.type})", *_details(lp)]
            layer = self._add("layer", lines, lp.type)
            for blob in lp.bottom:
                if blob not in current:  # a net input (or a bottom of a filtered-out layer)
                    current[blob] = self._add("blob", [blob])
                self.edges.append((current[blob], layer))
            for blob in lp.top:
                if blob in lp.bottom or blob not in current:
                    current[blob] = self._add("blob", [blob])
                self.edges.append((layer, current[blob]))
        for blob in list(param.input):
            if blob not in current:
                self._add("blob", [blob])
        self._rank()

    def _add(self, kind: str, lines: list[str], layer_type: str = "") -> int:
        width = max(len(line) for line in lines) * CHAR_W + (24 if kind == "layer" else 30)
        self.nodes.append({"kind": kind, "lines": lines, "type": layer_type, "w": width,
                           "h": len(lines) * LINE_H + 12, "rank": 0})
        return len(self.nodes) - 1

    def _rank(self) -> None:
        preds: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for a, b in self.edges:
            preds[b].append(a)
        self.preds = preds
        for i in range(len(self.nodes)):  # node ids are in topological order by construction
            if preds[i]:
                self.nodes[i]["rank"] = max(self.nodes[p]["rank"] for p in preds[i]) + 1

    def layout(self, rankdir: str = "TB") -> tuple[float, float]:
        """Give every node x, y (its centre); returns the picture's width and height."""
        ranks: dict[int, list[int]] = {}
        for i, node in enumerate(self.nodes):
            ranks.setdefault(node["rank"], []).append(i)
        along = "h" if rankdir == "TB" else "w"   # size along the rank direction
        across = "w" if rankdir == "TB" else "h"  # size across it
        pos_across: dict[int, float] = {}
        depth, extent = PAD, 0.0
        rows = []
        for r in sorted(ranks):
            ids = ranks[r]
            if r:
                ids.sort(key=lambda i: (sum(pos_across.get(p, 0) for p in self.preds[i]) /
                                        max(len(self.preds[i]), 1)) if self.preds[i] else 0)
            size = max(self.nodes[i][along] for i in ids)
            offset = 0.0
            for i in ids:
                pos_across[i] = offset + self.nodes[i][across] / 2
                offset += self.nodes[i][across] + GAP_NODE
            rows.append((ids, depth + size / 2, offset - GAP_NODE))
            extent = max(extent, offset - GAP_NODE)
            depth += size + GAP_RANK
        for ids, centre, row_extent in rows:
            shift = PAD + (extent - row_extent) / 2
            for i in ids:
                a = pos_across[i] + shift
                self.nodes[i]["x"], self.nodes[i]["y"] = (a, centre) if rankdir == "TB" else (centre, a)
        size_across = extent + 2 * PAD
        size_along = depth - GAP_RANK + PAD
        return (size_across, size_along) if rankdir == "TB" else (size_along, size_across)


def _anchor(node: dict, towards: dict) -> tuple[float, float]:
    """Where the segment from ``node``'s centre to ``towards`` leaves the node's outline."""
    dx, dy = towards["x"] - node["x"], towards["y"] - node["y"]
    if dx == 0 and dy == 0:
        return node["x"], node["y"]
    hw, hh = node["w"] / 2, node["h"] / 2
    if node["kind"] == "blob":  # ellipse
        t = 1.0 / ((dx / hw) ** 2 + (dy / hh) ** 2) ** 0.5
    else:  # box
        t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
    return node["x"] + dx * t, node["y"] + dy * t


LANE = 14.0


def _long_edge_paths(graph: Graph, rankdir: str, width: float, height: float):
    """Edges that skip ranks run in lanes beside the picture, not through the boxes between.
    Returns ({edge index: polyline points}, the enlarged width, height)."""
    tb = rankdir == "TB"
    paths, lane = {}, 0
    for k, (a, b) in enumerate(graph.edges):
        na, nb = graph.nodes[a], graph.nodes[b]
        if nb["rank"] - na["rank"] <= 1:
            continue
        side = (width if tb else height) - PAD + LANE * (lane + 1)
        lane += 1
        if tb:
            start, end = {"x": side, "y": na["y"] + na["h"]}, {"x": side, "y": nb["y"] - nb["h"]}
        else:
            start, end = {"x": na["x"] + na["w"], "y": side}, {"x": nb["x"] - nb["w"], "y": side}
        paths[k] = [_anchor(na, start), (start["x"], start["y"]), (end["x"], end["y"]), _anchor(nb, end)]
    if tb:
        width += LANE * lane
    else:
        height += LANE * lane
    return paths, width, height


def to_svg(graph: Graph, rankdir: str = "TB", title: str = "") -> str:
    width, height = graph.layout(rankdir)
    paths, width, height = _long_edge_paths(graph, rankdir, width, height)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f"<title>{escape(title)}</title>",
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/>'
           "</marker></defs>",
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for k, (a, b) in enumerate(graph.edges):
        if k in paths:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in paths[k])
            out.append(f'<polyline points="{points}" fill="none" stroke="#555" stroke-width="1.2" '
                       f'marker-end="url(#arrow)"/>')
            continue
        na, nb = graph.nodes[a], graph.nodes[b]
        x1, y1 = _anchor(na, nb)
        x2, y2 = _anchor(nb, na)
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#555" '
                   f'stroke-width="1.2" marker-end="url(#arrow)"/>')
    for node in graph.nodes:
        x, y, w, h = node["x"], node["y"], node["w"], node["h"]
        if node["kind"] == "layer":
            fill = LAYER_FILL.get(node["type"], "#eeeeee")
            out.append(f'<g class="layer"><rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" '
                       f'height="{h:.1f}" rx="4" fill="{fill}" stroke="#333"/>')
        else:
            out.append(f'<g class="blob"><ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{w / 2:.1f}" '
                       f'ry="{h / 2:.1f}" fill="#fffbe6" stroke="#777"/>')
        top = y - (len(node["lines"]) - 1) * LINE_H / 2
        for k, line in enumerate(node["lines"]):
            weight = ' font-weight="bold"' if k == 0 and node["kind"] == "layer" else ""
            out.append(f'<text x="{x:.1f}" y="{top + k * LINE_H + 4:.1f}" text-anchor="middle"{weight}>'
                       f"{escape(line)}</text>")
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def run(args) -> int:
    from .. import config  # noqa: PLC0415
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..log import get_logger  # noqa: PLC0415

    if not args.out.lower().endswith(".svg"):
        raise ConfigError(f"'{args.out}': draw_net writes SVG", hint="name the output file *.svg")
    param = config.load_net(args.net)
    graph = Graph(param, args.phase)
    write_text(args.out, to_svg(graph, args.rankdir, title=param.name or os.path.basename(args.net)))
    layers = sum(1 for n in graph.nodes if n["kind"] == "layer")
    get_logger().info("Drawing net to %s (%d layers, %d blobs)", args.out, layers, len(graph.nodes) - layers)
    return 0
