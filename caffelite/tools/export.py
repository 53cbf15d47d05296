"""``caffelite export``: write a trained deploy net in another framework's format.

    caffelite export --model deploy.yaml --weights w.caffemodel --format onnx out.onnx
    caffelite export --model deploy.prototxt --weights w.caffemodel.h5 out.onnx --dynamic_batch --verify

The net is built in TEST phase (``--level``/``--stage`` select layers as for
``caffelite test``); its Input layers become the model's inputs and its output
blobs the model's outputs. ``--verify`` runs the exported model with
onnxruntime on random inputs and compares it with caffelite's forward pass.
A layer ONNX cannot express stops the export with its name and type.
"""
from __future__ import annotations

import logging

from ..cli import _flag
from ..errors import ConfigError

COMMAND = "export"
HELP = "export a deploy net with its weights (ONNX)"
FORMATS = ("onnx",)

log = logging.getLogger("caffelite")


def add_arguments(parser) -> None:
    parser.add_argument("output", metavar="OUT", help="file to write, e.g. model.onnx")
    _flag(parser, "model", required=True, help="deploy net file (.yaml or .prototxt) with Input layers")
    _flag(parser, "weights", default=None, help="comma-separated .caffemodel / .h5 files")
    _flag(parser, "format", choices=FORMATS, default="onnx", help="output format")
    _flag(parser, "dynamic_batch", action="store_true", help="leave the batch size (axis 0) free")
    _flag(parser, "output_blobs", default="", help="comma-separated blobs to expose as outputs "
                                                   "(default: the net's outputs)")
    _flag(parser, "verify", action="store_true", help="compare onnxruntime with caffelite on random inputs")
    _flag(parser, "level", type=int, default=0, help="net state level")
    _flag(parser, "stage", default="", help="comma-separated net state stages")
    _flag(parser, "plugin", action="append", default=[], help="import MODULE to register its layers")


def run(args) -> int:
    from .. import config  # noqa: PLC0415
    from ..io.weights import copy_weights  # noqa: PLC0415
    from ..layers.base import TEST  # noqa: PLC0415
    from ..net import Net  # noqa: PLC0415
    from ..onnx_export import export_onnx  # noqa: PLC0415

    net = Net(config.load_net(args.model), phase=TEST, level=args.level,
              stages=[s for s in args.stage.split(",") if s], source=args.model)
    try:
        if args.weights:
            copy_weights(net, args.weights)
        else:
            log.warning("no --weights: exporting the weights the fillers made")
        outputs = [b for b in args.output_blobs.split(",") if b] or None
        model = export_onnx(net, args.output, dynamic_batch=args.dynamic_batch, outputs=outputs)
        log.info("Wrote %s: inputs %s, outputs %s, %d nodes", args.output,
                 ", ".join(i.name for i in model.graph.input),
                 ", ".join(o.name for o in model.graph.output), len(model.graph.node))
        if args.verify:
            error = verify(net, args.output)
            log.info("onnxruntime vs caffelite: largest relative error %.3g", error)
            if error > 1e-4:
                raise ConfigError(f"the exported model differs from caffelite (relative error {error:.3g})",
                                  hint="please report this with the net file")
    finally:
        net.close()
    return 0


def verify(net, path: str, seed: int = 0) -> float:
    """Largest relative error of onnxruntime's outputs against caffelite's on random inputs."""
    import numpy as np  # noqa: PLC0415

    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        raise ConfigError("--verify needs onnxruntime", hint="pip install onnxruntime") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for item in session.get_inputs():
        blob = net.blobs[item.name]
        feeds[item.name] = rng.standard_normal(blob.shape).astype(np.float32)
        blob.set_data(feeds[item.name])
    net.forward()
    worst = 0.0
    for item, got in zip(session.get_outputs(), session.run(None, feeds)):
        want = net.blobs[item.name].cpu_data()
        scale = max(float(np.abs(want).max()), 1e-12)
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    return worst
