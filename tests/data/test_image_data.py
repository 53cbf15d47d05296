"""ImageData: list files, Caffe's OpenCV resize, shuffle per epoch, exact resume, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from layer_testing import forward, make_layer, setup
from caffelite.blob import Blob
from caffelite.data.datum import decode_image
from caffelite.data.lmdb_source import iter_records
from caffelite.data.resize import resize_chw as resize_linear
from caffelite.errors import ConfigError, DataError
from caffelite.layers.base import TEST, TRAIN, LayerContext
from caffelite.proto import pb

IMAGES = FIXTURES / "images"


def image_data(tmp_path=None, made=None, num_top=2, phase=TEST, seed=3, transform=None, **param):
    layer = make_layer("ImageData", phase=phase, seed=seed, dtype=np.float32,
                       image_data_param=param, transform_param=transform or {})
    _, top = setup(layer, [], num_top)
    if made is not None:
        made.append(layer)
    return layer, top


@pytest.fixture
def made():
    layers = []
    yield layers
    for layer in layers:
        layer.close()


def run(layer, top, k):
    return [forward(layer, [], top) for _ in range(k)]


def caffe_records(db):
    out = []
    for _, value in iter_records(str(IMAGES / db)):
        d = pb.Datum()
        d.ParseFromString(value)
        out.append(decode_image(d.data) if d.encoded else
                   np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width))
    return np.stack(out)


@pytest.mark.parametrize("db, size, is_color", [
    ("lmdb_raw_32", (32, 32), True), ("lmdb_png_24x28", (24, 28), True), ("lmdb_gray_16", (16, 16), False)])
def test_resized_images_match_caffe(made, db, size, is_color):
    """convert_imageset's records were made by OpenCV's imread + resize, as ImageData reads."""
    layer, top = image_data(made=made, source=str(IMAGES / "list.txt"), root_folder=str(IMAGES) + "/",
                            batch_size=8, new_height=size[0], new_width=size[1], is_color=is_color)
    outs = run(layer, top, 3)
    data = np.concatenate([o[0] for o in outs])
    expected = caffe_records(db)
    assert data.shape == expected.shape == (24, 3 if is_color else 1) + size
    # JPEG decoders and grey conversion may round differently; colour PNGs match exactly
    assert np.abs(data - expected).max() <= 1
    lines = (IMAGES / "list.txt").read_text().split("\n")
    png = [i for i, line in enumerate(lines) if ".png" in line]
    if is_color:
        np.testing.assert_array_equal(data[png], expected[png])
    assert np.concatenate([o[1] for o in outs]).tolist() == [i % 2 for i in range(24)]


def test_resize_linear_reference():
    """OpenCV's INTER_LINEAR written out pixel by pixel (11-bit weights, 8-bit vertical rounding).

    Border columns take the edge pixel with weight 1; border rows keep their
    weights and only clamp the row index, as OpenCV's kernels do.
    """
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 7, 9), dtype=np.uint8)
    for h, w in ((4, 5), (11, 13), (7, 3), (1, 1)):
        out = resize_linear(image, h, w)
        for y in range(h):
            fy = np.float32((y + 0.5) * 7 / h - 0.5)
            sy = int(np.floor(fy))
            fy = np.float32(fy - sy)
            by = [int(np.rint((1 - fy) * 2048)), int(np.rint(fy * 2048))]
            row_index = [min(max(sy + k, 0), 6) for k in (0, 1)]
            for x in range(w):
                fx = np.float32((x + 0.5) * 9 / w - 0.5)
                sx = int(np.floor(fx))
                fx = np.float32(fx - sx)
                if sx < 0 or sx >= 8:
                    sx, fx = min(max(sx, 0), 8), np.float32(0)
                ax = [int(np.rint((1 - fx) * 2048)), int(np.rint(fx * 2048))]
                for c in range(2):
                    rows = [int(image[c, r, sx]) * ax[0] + int(image[c, r, min(sx + 1, 8)]) * ax[1]
                            for r in row_index]
                    want = (((by[0] * (rows[0] >> 4)) >> 16) + ((by[1] * (rows[1] >> 4)) >> 16) + 2) >> 2
                    assert out[c, y, x] == want
    halved = resize_linear(image[:, :6, :8], 3, 4).astype(int)
    blocks = image[:, :6, :8].astype(int).reshape(2, 3, 2, 4, 2).sum(axis=(2, 4))
    np.testing.assert_array_equal(halved, (blocks + 2) >> 2)


def write_images(folder, count, size=(4, 5), grey_every=0):
    """PNGs whose pixels hold their index (BGR = i, 2i, 3i; grey i); returns the list text."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"img {i:02d}.png"  # a space in the name: the label is after the last space
        if grey_every and i % grey_every == 0:
            Image.fromarray(np.full(size, i, np.uint8), "L").save(folder / name)
        else:
            Image.fromarray(np.full(size + (3,), (3 * i, 2 * i, i), np.uint8), "RGB").save(folder / name)
        lines.append(f"{name} {i % 3}")
    return "\n".join(lines) + "\n"


def ids(outs):
    """Which image each item is (BGR channel 0 holds the index)."""
    return np.concatenate([o[0][:, 0, 0, 0] for o in outs]).astype(int).tolist()


def test_paths_beside_the_list_labels_and_colour(tmp_path, made):
    (tmp_path / "list.txt").write_text(write_images(tmp_path, 5, grey_every=2))
    layer, top = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=3)
    outs = run(layer, top, 2)
    assert ids(outs) == [0, 1, 2, 3, 4, 0]
    assert np.concatenate([o[1] for o in outs]).tolist() == [0, 1, 2, 0, 1, 0]
    data = outs[0][0]
    assert data.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(data[1, :, 0, 0], [1, 2, 3])  # colour: B, G, R
    np.testing.assert_array_equal(data[2, :, 0, 0], [2, 2, 2])  # grey expanded to 3 channels
    grey, gtop = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=2, is_color=False)
    out = forward(grey, [], gtop)[0]
    assert out.shape == (2, 1, 4, 5)
    assert out[0, 0, 0, 0] == 0 and abs(out[1, 0, 0, 0] - (0.299 * 3 + 0.587 * 2 + 0.114)) <= 1


def test_shuffle_every_epoch_and_exact_resume(tmp_path, made):
    (tmp_path / "list.txt").write_text(write_images(tmp_path / "imgs", 10))
    kwargs = dict(source=str(tmp_path / "list.txt"), root_folder=str(tmp_path / "imgs"), batch_size=5,
                  shuffle=True)
    layer, top = image_data(made=made, phase=TRAIN, transform={"mirror": True}, **kwargs)
    seen = ids(run(layer, top, 6))
    epochs = [seen[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != list(range(10)) and len({tuple(e) for e in epochs}) == 3
    state = json.loads(json.dumps(layer.state_dict()))
    expected = run(layer, top, 3)
    other, other_top = image_data(made=made, phase=TRAIN, transform={"mirror": True}, seed=99, **kwargs)
    run(other, other_top, 1)
    other.load_state_dict(state)
    for want, got in zip(expected, run(other, other_top, 3)):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])


def test_rand_skip_and_rank_slices(tmp_path, made):
    (tmp_path / "list.txt").write_text(write_images(tmp_path, 6))
    source = str(tmp_path / "list.txt")
    layer, top = image_data(made=made, source=source, batch_size=6, rand_skip=5, seed=4)
    skip = layer.state_dict()["skip"]
    assert 0 <= skip < 5
    assert ids([forward(layer, [], top)]) == [(skip + i) % 6 for i in range(6)]
    slices = []
    for rank in (0, 1):
        layer = make_layer("ImageData", phase=TRAIN, image_data_param={
            "source": source, "batch_size": 3, "shuffle": True})
        layer.ctx = LayerContext(phase=TRAIN, seed=10 + rank, rank=rank, world_size=2)
        top = [Blob(()), Blob(())]
        layer.layer_setup([], top)
        made.append(layer)
        slices.append(ids(run(layer, top, 2)))
    merged = [slices[r][i] for i in range(6) for r in (0, 1)]
    assert sorted(merged[:6]) == list(range(6)) and sorted(merged[6:]) == list(range(6))


def test_crop_and_mirror_apply(tmp_path, made):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 7\n")
    layer, top = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=4,
                            transform={"crop_size": 4, "mean_value": [10], "scale": 0.5})
    data, label = forward(layer, [], top)
    bgr = pixels[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    expected = (bgr[:, 1:5, 2:6] - 10) * 0.5  # TEST: centre crop
    for item in data:
        np.testing.assert_array_equal(item, expected)
    assert label.tolist() == [7] * 4


def test_list_errors(tmp_path, made):
    (tmp_path / "imgs").mkdir()
    write_images(tmp_path / "imgs", 2)
    cases = [
        ("", DataError, "names no images"),
        ("\n  \n", DataError, "names no images"),
        ("img 00.png 0\nimg 01.png one\n", DataError, r"list.txt:2: label 'one' of 'img 01.png' is not an integer"),
        ("img00.png\n", DataError, r"list.txt:1: 'img00.png' is not 'path label'"),
    ]
    for text, error, message in cases:
        (tmp_path / "list.txt").write_text(text)
        with pytest.raises(error, match=message):
            image_data(made=made, source=str(tmp_path / "list.txt"), root_folder=str(tmp_path / "imgs"))
    with pytest.raises(DataError, match="list file .*missing.txt' does not exist"):
        image_data(made=made, source=str(tmp_path / "missing.txt"))
    (tmp_path / "list.txt").write_text("img 00.png 0\n")
    with pytest.raises(ConfigError, match="new_height and new_width must be set together"):
        image_data(made=made, source=str(tmp_path / "list.txt"), new_height=4)


def test_missing_and_corrupt_images_name_the_list_line(tmp_path, made):
    write_images(tmp_path, 2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "list.txt").write_text("img 00.png 0\n\ngone.png 1\nbroken.jpg 0\n")
    layer, top = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=1)
    forward(layer, [], top)
    with pytest.raises(DataError, match=r"list.txt:3: cannot read image '.*gone.png'.*root_folder"):
        forward(layer, [], top)
    with pytest.raises(DataError, match="gone.png"):  # the same error again, not a hang
        forward(layer, [], top)
    (tmp_path / "list2.txt").write_text("broken.jpg 0\n")
    with pytest.raises(DataError, match=r"list2.txt:1: cannot decode image '.*broken.jpg'"):
        image_data(made=made, source=str(tmp_path / "list2.txt"))


def test_images_of_different_sizes_in_one_batch(tmp_path, made):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "b.png")
    (tmp_path / "list.txt").write_text("a.png 0\nb.png 1\n")
    layer, top = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=2)
    with pytest.raises(DataError, match=r"image 'b.png' \(.*list.txt:2\) is 3x4x5 but the batch's "
                                        r"first item is 3x4x4"):
        forward(layer, [], top)
    ok, ok_top = image_data(made=made, source=str(tmp_path / "list.txt"), batch_size=2,
                            new_height=3, new_width=3)
    assert forward(ok, [], ok_top)[0].shape == (2, 3, 3, 3)
