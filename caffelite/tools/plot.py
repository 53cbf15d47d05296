"""``caffelite plot``: loss, accuracy and learning rate against iterations, as a picture.

    caffelite plot RUN_OR_LOG OUT.png

RUN_OR_LOG is a run folder (its metrics.csv, written by ``caffelite train``), a
metrics.csv itself, or a training log of Caffe or caffelite. Logs are read as
Caffe's tools/extra/parse_log.py reads them: ``Iteration N, loss = x`` (the
smoothed training loss), ``Iteration N, lr = x``, ``Train net output #k: name
= v`` and ``Test net output #k: name = v`` after ``Iteration N, Testing net``.
glog prefixes with and without the year (``I20261123 ...`` / ``I1123 ...``)
are both understood. The picture has three panels: loss (train smoothed, and
test outputs named like ``*loss*``), accuracy (outputs named like ``*acc*``)
and learning rate. The format follows OUT's extension (png, svg, pdf).
Needs matplotlib (``pip install 'caffelite[plot]'``).
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict

from ..errors import ConfigError, DataError

COMMAND = "plot"
HELP = "draw loss, accuracy and learning rate curves from a run folder or a training log"

_PREFIX = re.compile(r"^[IWEF](?:\d{8}|\d{4}) \d\d:\d\d:\d\d(?:\.\d+)?\s+\d+ [^\]]*\] ?(.*)$")
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"
_TEST_START = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_TRAIN_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUMBER)
_LR = re.compile(r"Iteration (\d+), lr = " + _NUMBER)
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = " + _NUMBER)


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_LOG",
                        help="a run folder (metrics.csv), a metrics.csv, or a Caffe/caffelite log")
    parser.add_argument("out", metavar="OUT.png", help="the picture to write (.png, .svg or .pdf)")


SMOOTHED = "train/smoothed_loss"


class Curves:
    """Series by name: 'train/smoothed_loss', 'lr', 'train/<output>', 'test/<output>' ...;
    each a list of (iteration, value)."""

    def __init__(self):
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def add(self, name: str, iteration: int, value: float) -> None:
        self.series[name].append((iteration, value))

    def __bool__(self) -> bool:
        return any(self.series.values())


def parse_log(lines) -> Curves:
    """Curves from the lines of a Caffe or caffelite log (see the module doc)."""
    curves = Curves()
    train_iter, test_iter, test_net = None, None, 0
    for raw in lines:
        line = raw.rstrip("\n")
        match = _PREFIX.match(line)
        message = match.group(1) if match else line
        if (m := _TEST_START.search(message)) is not None:
            test_iter, test_net = int(m.group(1)), int(m.group(2))
        elif (m := _TRAIN_LOSS.search(message)) is not None:
            train_iter = int(m.group(1))
            curves.add(SMOOTHED, train_iter, float(m.group(2)))
        elif (m := _LR.search(message)) is not None:
            curves.add("lr", int(m.group(1)), float(m.group(2)))
        elif (m := _OUTPUT.search(message)) is not None:
            kind, name, value = m.group(1), m.group(3), float(m.group(4))
            if kind == "Train" and train_iter is not None:
                curves.add(f"train/{name}", train_iter, value)
            elif kind == "Test" and test_iter is not None:
                prefix = "test" if test_net == 0 else f"test{test_net}"
                curves.add(f"{prefix}/{name}", test_iter, value)
    return curves


def read_metrics_csv(path: str) -> Curves:
    """Curves from a run's metrics.csv ('loss' is the smoothed train loss)."""
    curves = Curves()
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            if None in row.values() or None in row:
                continue  # a partial last line (the run was killed while writing it)
            try:
                iteration = int(row["iteration"])
            except (KeyError, TypeError, ValueError):
                continue
            for key, text in row.items():
                if key in ("iteration", "wall_time", "phase") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                curves.add({"loss": SMOOTHED, "lr": "lr"}.get(key, key), iteration, value)
    return curves


def load_curves(source: str) -> Curves:
    if os.path.isdir(source):
        path = os.path.join(source, "metrics.csv")
        if not os.path.isfile(path):
            raise DataError(f"'{source}' has no metrics.csv", hint="pass a run folder of caffelite train "
                            "or a training log file")
        return read_metrics_csv(path)
    if not os.path.isfile(source):
        raise DataError(f"'{source}' does not exist", hint="pass a run folder, a metrics.csv or a log file")
    if source.endswith(".csv"):
        return read_metrics_csv(source)
    try:
        with open(source, encoding="utf-8", errors="replace") as f:
            return parse_log(f)
    except OSError as exc:
        raise DataError(f"cannot read '{source}': {exc}") from None


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ConfigError("caffelite plot needs matplotlib, which is not installed",
                          hint="pip install 'caffelite[plot]' (or pip install matplotlib)") from None
    return plt


def draw(curves: Curves, out: str, title: str = "") -> None:
    """Write the three-panel picture of ``curves`` to ``out`` (atomically)."""
    from ..io.atomic import atomic_path  # noqa: PLC0415

    plt = _pyplot()
    fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    series = curves.series
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    panels = (
        (ax_loss, "loss", [k for k in series if k == SMOOTHED or
                           ("loss" in k.split("/")[-1] and not k.startswith("train/"))]),
        (ax_acc, "accuracy", [k for k in series if "acc" in k.split("/")[-1]]),
        (ax_lr, "learning rate", [k for k in series if k == "lr"]),
    )
    for ax, label, keys in panels:
        for key in sorted(keys):
            points = sorted(series[key])
            style = "-" if key.startswith("train") or key == "lr" else "o-"
            name = "train (smoothed)" if key == SMOOTHED else key
            ax.plot([p[0] for p in points], [p[1] for p in points], style, markersize=3, label=name)
        values = [v for key in keys for _, v in series[key]]
        if ax is ax_loss and values and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")  # losses fall by orders of magnitude; a linear axis hides the tail
            label += " (log scale)"
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if keys:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {label} in the source", ha="center", va="center", transform=ax.transAxes)
    ax_lr.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=100)
    except ValueError as exc:  # an unknown format
        raise ConfigError(f"cannot write '{out}': {exc}", hint="use a .png, .svg or .pdf name") from None
    finally:
        plt.close(fig)


def run(args) -> int:
    from ..log import get_logger  # noqa: PLC0415

    curves = load_curves(args.source)
    if not curves:
        raise DataError(f"'{args.source}' holds no training curves",
                        hint="give a caffelite run folder or a log with 'Iteration N, loss = x' lines")
    draw(curves, args.out, title=os.path.basename(os.path.normpath(args.source)))
    counts = ", ".join(f"{k} ({len(v)})" for k, v in sorted(curves.series.items()))
    get_logger().info("Wrote %s: %s", args.out, counts)
    return 0
