"""DataTransformer against a per-pixel NumPy reference of Caffe's formula."""
import numpy as np
import pytest

from caffelite.data.transform import DataTransformer
from caffelite.errors import ConfigError
from caffelite.io.binaryproto import write_binaryproto
from caffelite.proto import pb

TRAIN, TEST = 0, 1


def reference(item, crop, h0, w0, flip, mean, scale):
    """Caffe's DataTransformer::Transform for one C x H x W item, loop by loop."""
    c, h, w = item.shape
    oh, ow = (crop, crop) if crop else (h, w)
    out = np.zeros((c, oh, ow))
    for ci in range(c):
        for y in range(oh):
            for x in range(ow):
                value = float(item[ci, h0 + y, w0 + x])
                if mean is not None:
                    value -= mean[ci, h0 + y, w0 + x] if mean.ndim == 3 else mean[ci if len(mean) > 1 else 0]
                out[ci, y, ow - 1 - x if flip else x] = value * scale
    return out


def transformer(phase=TEST, dtype=np.float64, **fields):
    return DataTransformer(pb.TransformationParameter(**fields), phase, dtype)


def batch(n=6, c=3, h=7, w=9, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


@pytest.mark.parametrize("fields, mean", [
    ({}, None),
    ({"scale": 0.5}, None),
    ({"crop_size": 5}, None),
    ({"mean_value": [10.0]}, np.array([10.0])),
    ({"mean_value": [10.0, 20.0, 30.0], "scale": 0.25, "crop_size": 4}, np.array([10.0, 20.0, 30.0])),
])
def test_test_phase_centre_crop(fields, mean):
    x = batch()
    out = transformer(**fields)(x)
    crop = fields.get("crop_size", 0)
    h0, w0 = ((7 - crop) // 2, (9 - crop) // 2) if crop else (0, 0)
    for n in range(len(x)):
        np.testing.assert_allclose(out[n], reference(x[n], crop, h0, w0, False, mean,
                                                     fields.get("scale", 1.0)), rtol=1e-12)


def test_mean_file_taken_at_the_source_position(tmp_path):
    x = batch()
    mean = np.random.default_rng(1).uniform(0, 255, (3, 7, 9)).astype(np.float32)
    write_binaryproto(str(tmp_path / "mean.binaryproto"), mean)
    t = transformer(crop_size=3, scale=0.125, mean_file=str(tmp_path / "mean.binaryproto"),
                    dtype=np.float32)
    out = t(x)
    assert out.dtype == np.float32 and out.shape == (6, 3, 3, 3)
    for n in range(len(x)):
        np.testing.assert_allclose(out[n], reference(x[n], 3, 2, 3, False, mean, 0.125), rtol=1e-6)


def matches(out_item, item, crop, mean, scale):
    """The (h0, w0, flip) choices that reproduce ``out_item``."""
    c, h, w = item.shape
    found = []
    for h0 in range(h - crop + 1):
        for w0 in range(w - crop + 1):
            for flip in (False, True):
                if np.allclose(out_item, reference(item, crop, h0, w0, flip, mean, scale)):
                    found.append((h0, w0, flip))
    return found


def test_train_random_crop_and_mirror():
    x = batch(n=40, h=6, w=6)
    mean = np.array([5.0, 6.0, 7.0])
    t = transformer(TRAIN, crop_size=4, mirror=True, mean_value=list(mean), scale=0.5)
    assert t.is_random
    out = t(x, np.random.default_rng(3))
    choices = []
    for n in range(len(x)):
        found = matches(out[n], x[n], 4, mean, 0.5)
        assert found, f"item {n} is no crop/mirror of its input"
        choices.append(found[0])
    assert len({c[:2] for c in choices}) > 3  # offsets vary
    assert {c[2] for c in choices} == {False, True}  # both mirrored and not
    again = t(x, np.random.default_rng(3))
    np.testing.assert_array_equal(out, again)  # the Generator alone decides


def test_mirror_in_test_phase_and_mean_file_with_mirror(tmp_path):
    x = batch(n=30, h=5, w=5)
    mean = np.random.default_rng(2).uniform(0, 255, (3, 5, 5))
    write_binaryproto(str(tmp_path / "m.binaryproto"), mean, legacy=False)
    t = transformer(TEST, crop_size=3, mirror=True, mean_file=str(tmp_path / "m.binaryproto"))
    out = t(x, np.random.default_rng(0))
    flips = []
    for n in range(len(x)):
        plain = reference(x[n], 3, 1, 1, False, mean, 1.0)
        mirrored = reference(x[n], 3, 1, 1, True, mean, 1.0)
        assert np.allclose(out[n], plain) or np.allclose(out[n], mirrored)
        flips.append(np.allclose(out[n], mirrored) and not np.allclose(out[n], plain))
    assert 0 < sum(flips) < len(x)


def test_float_input_and_reused_output():
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    t = transformer(scale=2.0, dtype=np.float32)
    out = np.empty((2, 1, 4, 4), np.float32)
    assert t(x, out=out) is out
    np.testing.assert_allclose(out, (x * 2).astype(np.float32), rtol=1e-6)


def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="both mean_file and mean_value"):
        transformer(mean_file="x.binaryproto", mean_value=[1.0])
    with pytest.raises(ConfigError, match="force_color and force_gray"):
        transformer(force_color=True, force_gray=True)
    with pytest.raises(ConfigError, match="crop_size 8 is larger"):
        transformer(crop_size=8)(batch())
    with pytest.raises(ConfigError, match="2 mean_value entries for 3-channel"):
        transformer(mean_value=[1.0, 2.0])(batch())
    write_binaryproto(str(tmp_path / "m.binaryproto"), np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="is 3x4x4 but the images are 3x7x9"):
        transformer(mean_file=str(tmp_path / "m.binaryproto")).output_shape((3, 7, 9))
