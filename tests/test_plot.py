"""caffelite plot (curves from a Caffe log or a run folder) and caffelite draw_net (SVG)."""
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from caffelite.cli import main
from caffelite.tools.plot import SMOOTHED, load_curves, parse_log
from conftest import FIXTURES

LOG = FIXTURES / "lenet" / "train.log"
LENET = FIXTURES / "lenet" / "lenet_train_test.prototxt"
SVG = "{http://www.w3.org/2000/svg}"

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:  # the optional 'plot' extra
    HAVE_MPL = False
needs_matplotlib = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (caffelite[plot]) not installed")


def test_parse_the_real_caffe_log():
    curves = parse_log(LOG.read_text().splitlines())
    series = curves.series
    loss = series[SMOOTHED]
    assert loss[0] == (0, 2.30902) and loss[1] == (100, 0.214116)
    assert [it for it, _ in loss[:-1]] == list(range(0, 10000, 100))
    assert series["lr"][:2] == [(0, 0.01), (100, 0.00992565)]
    accuracy = series["test/accuracy"]
    assert len(accuracy) == 21 and accuracy[0] == (0, 0.1395) and accuracy[-1] == (10000, 0.987)
    assert series["test/loss"][-1] == (10000, 0.0476488)
    assert series["train/loss"][0] == (0, 2.30902)  # the net's own output


def test_both_glog_prefixes_and_caffelite_lines():
    lines = ["I20261123 01:19:09.432739 15494 solver.cpp:231] Iteration 0, loss = 2.5",
             "I1123 01:19:09.432791 15494 solver.cpp:247]     Train net output #0: loss = 2.5 (* 1 = 2.5 loss)",
             "I1123 01:19:09.432808 15494 base.py:403] Iteration 0, lr = 0.01",
             "I0210 13:39:22.381027 25210 base.py:367] Iteration 10 (24.05 iter/s, 0.41s/10 iters), loss = 1.5",
             "I0210 13:39:23.1 25210 base.py:488] Iteration 10, Testing net (#1)",
             "I0210 13:39:23.2 25210 base.py:383]     Test net output #0: accuracy = 0.5",
             "garbage line", "Iteration 20, loss = 1e-3"]
    series = parse_log(lines).series
    assert series[SMOOTHED] == [(0, 2.5), (10, 1.5), (20, 0.001)]
    assert series["lr"] == [(0, 0.01)]
    assert series["test1/accuracy"] == [(10, 0.5)]


def _curve_pixels(png):
    """Per panel (top, middle, bottom third): pixels of matplotlib's first two line colours."""
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = (np.abs(image - [31, 119, 180]).sum(axis=2) < 40)
    orange = (np.abs(image - [255, 127, 14]).sum(axis=2) < 40)
    thirds = np.array_split(np.arange(image.shape[0]), 3)
    return [(int(blue[rows].sum()), int(orange[rows].sum())) for rows in thirds], image.shape


@needs_matplotlib
def test_plot_the_real_caffe_log(tmp_path, capsys):
    out = tmp_path / "lenet.png"
    assert main(["plot", str(LOG), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels, shape = _curve_pixels(out)
    assert shape == (1000, 900, 3)
    (loss_blue, loss_orange), (acc_blue, _), (lr_blue, _) = panels
    assert loss_blue > 200 and loss_orange > 200  # test loss and smoothed train loss
    assert acc_blue > 200  # test accuracy
    assert lr_blue > 200  # learning rate


def test_plot_a_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.yaml").write_text("""name: tiny
layer:
  - {name: data, type: DummyData, top: [x, t],
     dummy_data_param: {shape: [{dim: [4, 6]}, {dim: [4, 3]}], data_filler: [{type: gaussian}]}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 3}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
""")
    (tmp_path / "solver.yaml").write_text("net: net.yaml\ntest_iter: 2\ntest_interval: 10\nbase_lr: 0.01\n"
                                          "lr_policy: step\ngamma: 0.5\nstepsize: 10\nmax_iter: 30\ndisplay: 5\n"
                                          "snapshot_prefix: run/tiny\nsolver_mode: CPU\nrandom_seed: 1\n")
    assert main(["train", "--solver", "solver.yaml"]) == 0
    curves = load_curves("run")
    assert [it for it, _ in curves.series[SMOOTHED]] == [0, 5, 10, 15, 20, 25]
    assert curves.series["lr"][-1] == (25, 0.0025)
    assert [it for it, _ in curves.series["test/loss"]] == [0, 10, 20, 30]
    if not HAVE_MPL:
        return
    assert main(["plot", "run", "curves.svg"]) == 0
    ET.parse(tmp_path / "curves.svg")


def test_plot_errors(tmp_path, monkeypatch, capsys):
    assert main(["plot", str(tmp_path / "nope.log"), str(tmp_path / "x.png")]) == 3
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.log").write_text("nothing here\n")
    assert main(["plot", str(tmp_path / "empty.log"), str(tmp_path / "x.png")]) == 3
    assert "holds no training curves" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["plot", str(LOG), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs matplotlib" in err and "pip install 'caffelite[plot]'" in err


# ---- draw_net ---------------------------------------------------------------------------------------
def _svg(path):
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter(f"{SVG}text")]
    return root, texts


@pytest.mark.parametrize("rankdir", ["TB", "LR"])
def test_draw_net_svg_names_every_layer(tmp_path, rankdir, capsys):
    from caffelite.config import load_net

    out = tmp_path / "lenet.svg"
    assert main(["draw_net", str(LENET), str(out), "--rankdir", rankdir]) == 0
    root, texts = _svg(out)
    assert root.tag == f"{SVG}svg"
    names = [layer.name for layer in load_net(LENET).layer]
    assert set(names) <= set(texts)
    layers = [g for g in root.iter(f"{SVG}g") if g.get("class") == "layer"]
    assert len(layers) == len(names) == 11
    assert len(list(root.iter(f"{SVG}line"))) + len(list(root.iter(f"{SVG}polyline"))) >= 20
    assert "(Convolution)" in texts and "20 out, kernel 5, stride 1" in texts


def test_draw_net_phase_and_errors(tmp_path, capsys):
    out = tmp_path / "train.svg"
    assert main(["draw_net", str(LENET), str(out), "--phase", "TRAIN"]) == 0
    _, texts = _svg(out)
    assert "accuracy" not in texts and "loss" in texts
    assert main(["draw_net", str(LENET), str(tmp_path / "x.png")]) == 2
    assert "draw_net writes SVG" in capsys.readouterr().err
    assert main(["draw_net", str(tmp_path / "none.yaml"), str(out)]) == 2
