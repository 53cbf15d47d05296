"""The Python layer runs user classes, pycaffe-style or caffelite Layer subclasses."""
import sys

import numpy as np
import pytest

from caffelite import config
from caffelite.errors import ConfigError
from caffelite.net import Net
from layer_testing import check_gradient, run

USER_MODULE = '''
import numpy as np
from caffelite.layers import Layer

class Scale3:
    """pycaffe style: a plain class with param_str."""
    def setup(self, bottom, top):
        self.k = float(self.param_str or 3)
    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * top[0].diff

class Cube(Layer):
    num_bottom = 1
    num_top = 1
    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)
    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data ** 3
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 3 * bottom[0].data ** 2 * top[0].diff
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_layers_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_layers_mod"
    sys.modules.pop("user_layers_mod", None)


def test_pycaffe_style_class(user_module):
    x = np.random.default_rng(0).standard_normal((2, 3))
    layer, bottom, top, (y,) = run("Python", [x], python_param={"module": user_module, "layer": "Scale3",
                                                                "param_str": "2.5"})
    np.testing.assert_allclose(y, 2.5 * x)
    assert check_gradient(layer, bottom, top) > 0


def test_layer_subclass(user_module):
    x = np.random.default_rng(1).standard_normal((2, 3))
    layer, bottom, top, (y,) = run("Python", [x], python_param={"module": user_module, "layer": "Cube"})
    np.testing.assert_allclose(y, x ** 3)
    assert check_gradient(layer, bottom, top) > 0


def test_in_a_net(user_module):
    net = Net(config.parse_net(f"""
layer:
  - {{name: in, type: Input, top: x, input_param: {{shape: {{dim: [2, 2]}}}}}}
  - {{name: py, type: Python, bottom: x, top: y, python_param: {{module: {user_module}, layer: Scale3}}}}
"""))
    net.blobs["x"].set_data(np.ones((2, 2)))
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].cpu_data(), 3.0)


def test_missing_module_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        run("Python", [np.zeros((1, 1))], python_param={"module": "no_such_module_xyz", "layer": "X"})
