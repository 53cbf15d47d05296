"""debug_info logs Caffe's per-layer [Forward] / [Backward] lines."""
import logging

import numpy as np

from caffelite import config, debug_info
from caffelite.net import Net


def test_debug_lines(caplog):
    net = Net(config.parse_net("""
layer:
  - {name: in, type: Input, top: [x, t], input_param: {shape: [{dim: [2, 3]}, {dim: [2, 2]}]}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 2}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""))
    net.blobs["x"].set_data(np.full((2, 3), -2.0))
    net.blobs["t"].set_data(np.ones((2, 2)))
    debug_info.attach(net)
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net.forward_backward()
    lines = [r.getMessage() for r in caplog.records]
    assert "    [Forward] Layer in, top blob x data: 2" in lines
    assert "    [Forward] Layer ip, top blob y data: 0" in lines  # zero-filled weights and bias
    assert "    [Backward] Layer loss, bottom blob y diff: 0.5" in lines
    assert "    [Backward] Layer ip, param blob 0 diff: 2" in lines  # sum over items of 0.5 * 2
    assert "    [Backward] Layer ip, param blob 1 diff: 1" in lines
