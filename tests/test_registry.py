"""Registries: lookups with suggestions, duplicate names, and plugins that add layers."""
import sys

import pytest

from caffelite.cli import main
from caffelite.errors import ConfigError
from caffelite.registry import FILLERS, LAYERS, LR_POLICIES, SOLVERS, Registry, load_plugin

PLUGIN = '''
from caffelite.layers import NeuronLayer
from caffelite.registry import register_layer

@register_layer("PluginDouble")
class PluginDouble(NeuronLayer):
    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * top[0].diff
'''


def test_builtin_registries_are_filled():
    for name in ("Convolution", "Data", "SoftmaxWithLoss", "Python"):
        assert name in LAYERS
    assert {"SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"} <= set(SOLVERS.names())
    assert {"constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear"} <= set(FILLERS.names())
    assert {"fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"} <= set(LR_POLICIES.names())


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown layer type 'Convolutoin'.*did you mean 'Convolution'"):
        LAYERS.get("Convolutoin")


def test_duplicate_registration_is_refused():
    registry = Registry("thing")
    registry.register("a")(int)
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register("a")(float)


def test_plugin_module_adds_a_layer_for_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_plugin_layers.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = tmp_path / "net.yaml"
    net.write_text("layer:\n  - {name: in, type: Input, top: x, input_param: {shape: {dim: [2, 3]}}}\n"
                   "  - {name: d, type: PluginDouble, bottom: x, top: y}\n")
    try:
        assert main(["time", "--model", str(net), "--iterations", "1", "--plugin", "my_plugin_layers"]) == 0
        assert "PluginDouble" in LAYERS.names()
    finally:
        sys.modules.pop("my_plugin_layers", None)


def test_missing_plugin_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot import plugin module"):
        load_plugin("no_such_plugin_module_here")
