"""WindowData: Caffe's window file, fg/bg sampling, context padding, warp, mirror, mean."""
import numpy as np
import pytest
from PIL import Image

from layer_testing import forward, make_layer, setup
from caffelite.data.resize import resize_chw as resize_linear
from caffelite.errors import ConfigError, DataError
from caffelite.io.binaryproto import write_binaryproto
from caffelite.layers.base import TEST, TRAIN

W, H = 20, 16  # image size


@pytest.fixture
def made():
    layers = []
    yield layers
    for layer in layers:
        layer.close()


def window_layer(made, phase=TEST, seed=5, transform=None, **param):
    layer = make_layer("WindowData", phase=phase, seed=seed, dtype=np.float32,
                       window_data_param=param, transform_param=transform or {"crop_size": 10})
    _, top = setup(layer, [], 2)
    made.append(layer)
    return layer, top


def make_images(folder, count=2):
    rng = np.random.default_rng(1)
    images = []
    for i in range(count):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"im{i}.png")
        images.append(rgb[:, :, ::-1].transpose(2, 0, 1))  # C x H x W BGR, as the layer reads
    return images


def window_file(path, entries):
    """entries: [(image name, [(label, overlap, x1, y1, x2, y2), ...]), ...]"""
    lines = []
    for i, (name, windows) in enumerate(entries):
        lines += [f"# {i}", name, "3", str(H), str(W), str(len(windows))]
        lines += [" ".join(str(v) for v in w) for w in windows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def c_round(v):
    v = float(v)
    return int(np.sign(v) * np.floor(abs(v) + 0.5))


def caffe_window(image, box, crop, pad=0, square=False, mirror=False, mean=None, scale=1.0):
    """WindowDataLayer's per-window code, step by step in float (Dtype) arithmetic."""
    f = np.float32
    x1, y1, x2, y2 = box
    rows, cols = image.shape[1:]
    out = np.zeros((3, crop, crop), np.float32)
    size_w = size_h = crop
    pad_w = pad_h = 0
    if pad > 0 or square:
        context_scale = f(crop) / f(crop - 2 * pad)
        half_h, half_w = f((y2 - y1 + 1) / 2.0), f((x2 - x1 + 1) / 2.0)
        cx, cy = f(x1) + half_w, f(y1) + half_h
        if square:
            if half_h > half_w:
                half_w = half_h
            else:
                half_h = half_w
        x1, x2 = c_round(cx - half_w * context_scale), c_round(cx + half_w * context_scale)
        y1, y2 = c_round(cy - half_h * context_scale), c_round(cy + half_h * context_scale)
        uh, uw = y2 - y1 + 1, x2 - x1 + 1
        px1, py1, px2 = max(0, -x1), max(0, -y1), max(0, x2 - cols + 1)
        py2 = max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
        sx, sy = f(crop) / f(uw), f(crop) / f(uh)
        size_w, size_h = c_round(f(x2 - x1 + 1) * sx), c_round(f(y2 - y1 + 1) * sy)
        px1, px2, py1 = c_round(f(px1) * sx), c_round(f(px2) * sx), c_round(f(py1) * sy)
        pad_h = py1
        pad_w = px2 if mirror else px1
        size_h = min(size_h, crop - pad_h)
        size_w = min(size_w, crop - pad_w)
    warped = resize_linear(image[:, y1:y2 + 1, x1:x2 + 1], size_h, size_w)
    if mirror:
        warped = warped[:, :, ::-1]
    off = (mean.shape[2] - crop) // 2 if mean is not None else 0
    for c in range(3):
        for h in range(size_h):
            for w in range(size_w):
                m = mean[c, h + off + pad_h, w + off + pad_w] if mean is not None else 0
                out[c, h + pad_h, w + pad_w] = (f(warped[c, h, w]) - f(m)) * f(scale)
    return out


def test_parsing_sampling_and_labels(tmp_path, made, caplog):
    make_images(tmp_path)
    source = window_file(tmp_path / "windows.txt", [
        ("im0.png", [(3, 0.9, 1, 1, 8, 8), (2, 0.5, 0, 0, 5, 5), (1, 0.3, 2, 2, 9, 9)]),  # fg, fg, dropped
        ("im1.png", [(4, 0.1, 0, 0, 19, 15), (7, 0.0, 3, 3, 6, 6)]),  # background: labels become 0
    ])
    layer, top = window_layer(made, source=source, root_folder=str(tmp_path), batch_size=8,
                              fg_threshold=0.5, bg_threshold=0.3)
    assert len(layer.fg) == 2 and len(layer.bg) == 2
    data, label = forward(layer, [], top)
    assert data.shape == (8, 3, 10, 10)
    assert label.tolist()[:6] == [0] * 6  # 8 - int(8 * 0.25) background first, then foreground
    assert set(label.tolist()[6:]) <= {2, 3}
    other, other_top = window_layer(made, source=source, root_folder=str(tmp_path), batch_size=5,
                                    fg_fraction=0.5, fg_threshold=0.5, bg_threshold=0.3)
    assert (forward(other, [], other_top)[1] > 0).sum() == 2  # int(5 * 0.5)


@pytest.mark.parametrize("box, pad, mode", [
    ((2, 3, 13, 11), 0, "warp"),      # plain warp of the box to 10 x 10
    ((0, 0, 9, 7), 2, "warp"),        # context reaching outside the image: clipped and padded
    ((12, 5, 19, 15), 1, "square"),   # squared box at the bottom-right corner
    ((4, 2, 7, 13), 0, "square"),     # tall box squared without context
])
def test_window_pixels_match_caffe(tmp_path, made, box, pad, mode):
    image = make_images(tmp_path, 1)[0]
    source = window_file(tmp_path / "w.txt", [("im0.png", [(1, 1.0, *box), (0, 0.0, *box)])])
    mean = np.random.default_rng(2).uniform(0, 255, (3, 12, 12)).astype(np.float32)
    write_binaryproto(str(tmp_path / "mean.binaryproto"), mean[None])
    layer, top = window_layer(made, phase=TRAIN, source=source, root_folder=str(tmp_path) + "/",
                              batch_size=4, context_pad=pad, crop_mode=mode, scale=0.5,
                              transform={"crop_size": 10, "mirror": True,
                                         "mean_file": str(tmp_path / "mean.binaryproto")})
    flips = set()
    for _ in range(4):
        data, label = forward(layer, [], top)
        assert label.tolist() == [0, 0, 0, 1]
        for item in data:
            refs = [caffe_window(image, box, 10, pad, mode == "square", m, mean, 0.5) for m in (False, True)]
            matches = [np.allclose(item, ref, rtol=0, atol=1e-4) for ref in refs]
            assert any(matches)
            flips.add(matches.index(True))
    assert flips == {0, 1}


def test_mean_value_and_exact_resume(tmp_path, made):
    images = make_images(tmp_path, 2)
    source = window_file(tmp_path / "w.txt", [
        ("im0.png", [(1, 0.8, 0, 0, 9, 9), (0, 0.1, 5, 5, 19, 15)]),
        ("im1.png", [(2, 0.7, 3, 1, 12, 10), (0, 0.2, 0, 0, 19, 15)])])
    kwargs = dict(source=source, root_folder=str(tmp_path), batch_size=4, context_pad=1,
                  transform={"crop_size": 8, "mirror": True, "mean_value": [100, 110, 120]})
    layer, top = window_layer(made, phase=TRAIN, **kwargs)
    first = [forward(layer, [], top) for _ in range(2)]
    boxes = {0: [(0, 0, 9, 9), (5, 5, 19, 15)], 1: [(3, 1, 12, 10), (0, 0, 19, 15)]}
    mean = np.broadcast_to(np.array([100, 110, 120], np.float32)[:, None, None], (3, 8, 8))
    for item in first[0][0]:
        refs = [caffe_window(images[i], b, 8, 1, False, m, mean) for i in (0, 1) for b in boxes[i]
                for m in (False, True)]
        assert any(np.allclose(item, ref, atol=1e-4) for ref in refs)
    state = layer.state_dict()
    expected = [forward(layer, [], top) for _ in range(2)]
    other, other_top = window_layer(made, phase=TRAIN, seed=77, **kwargs)
    other.load_state_dict(state)
    for want, got in zip(expected, [forward(other, [], other_top) for _ in range(2)]):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])


def test_window_file_errors(tmp_path, made):
    make_images(tmp_path, 1)
    root = str(tmp_path)

    def fails(text, error, message, **extra):
        (tmp_path / "w.txt").write_text(text)
        with pytest.raises(error, match=message):
            window_layer(made, source=str(tmp_path / "w.txt"), root_folder=root, batch_size=4, **extra)

    fails("", DataError, "window file .* is empty")
    fails("# 0\nim0.png\n3\n16\n20\n1\n0 0.9 0 0 5 5\n", DataError,
          r"w.txt:7: foreground window \(overlap 0.9 >= 0.5\) has class 0")
    fails("# 0\nim0.png\n3\n16\n20\n1\n1 high 0 0 5 5\n", DataError, r"w.txt:7: 'high' is not a valid overlap")
    fails("# 0\nim0.png\n3\n16\n20\n2\n1 0.9 0 0 5 5\n", DataError, "ends where class index was expected")
    fails("0\nim0.png\n", DataError, r"w.txt:1: expected '# image_index'")
    fails("# 0\nim0.png\n3\n16\n20\n1\n1 0.9 0 0 5 5\n", DataError, "no background windows")
    fails("# 0\nim0.png\n3\n16\n20\n1\n1 0.9 0 0 5 5\n", ConfigError, "needs a crop_size",
          transform={"mirror": True})
    (tmp_path / "w.txt").write_text("# 0\nim0.png 3 16 20 2\n1 0.9 0 0 25 5\n0 0.1 0 0 3 3\n")
    layer, top = window_layer(made, source=str(tmp_path / "w.txt"), root_folder=root, batch_size=1,
                              fg_fraction=1.0)
    with pytest.raises(DataError, match=r"w.txt:3: window \(0, 0, 25, 5\) is not inside its 20x16 image"):
        forward(layer, [], top)
    (tmp_path / "w.txt").write_text("# 0\nnothere.png 3 16 20 2\n1 0.9 0 0 5 5\n0 0.1 0 0 3 3\n")
    layer, top = window_layer(made, source=str(tmp_path / "w.txt"), root_folder=root, batch_size=2)
    with pytest.raises(DataError, match="cannot read image '.*nothere.png' named in window file"):
        forward(layer, [], top)


def test_cache_images_reads_files_once(tmp_path, made):
    make_images(tmp_path, 1)
    source = window_file(tmp_path / "w.txt", [("im0.png", [(1, 0.9, 0, 0, 9, 9), (0, 0.0, 2, 2, 12, 12)])])
    layer, top = window_layer(made, source=source, root_folder=str(tmp_path), batch_size=4,
                              cache_images=True)
    (tmp_path / "im0.png").unlink()  # served from memory from now on
    assert forward(layer, [], top)[0].shape == (4, 3, 10, 10)
