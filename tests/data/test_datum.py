"""Datum records, LMDB reading/writing and binaryproto files, against real Caffe's files."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from caffelite.data.datum import (array_to_datum, datum_shape, datum_to_array, decode_datum,
                                  decode_image, encode_datum, encode_image, parse_datum)
from caffelite.data.lmdb_source import LMDBReader, count_records, iter_records, write_lmdb
from caffelite.errors import ConfigError, DataError
from caffelite.io.binaryproto import read_binaryproto, read_mean, write_binaryproto
from caffelite.proto import pb

IMAGES = FIXTURES / "images"


def list_labels(path):
    return [int(line.rsplit(" ", 1)[1]) for line in open(path) if line.strip()]


def read_all(db, **flags):
    arrays, labels, keys = [], [], []
    for key, value in iter_records(str(db)):
        array, label = decode_datum(value, key=key, source=str(db), **flags)
        arrays.append(array)
        labels.append(label)
        keys.append(key)
    return arrays, labels, keys


@pytest.mark.parametrize("split, count", [("train", 8000), ("test", 2000)])
def test_mnist_lmdbs(split, count):
    arrays, labels, keys = read_all(FIXTURES / "mnist" / f"mnist_{split}_lmdb")
    assert len(arrays) == count == count_records(str(FIXTURES / "mnist" / f"mnist_{split}_lmdb"))
    assert {a.shape for a in arrays} == {(1, 28, 28)} and arrays[0].dtype == np.uint8
    assert labels == list_labels(FIXTURES / "mnist" / f"{split}.txt")
    assert keys == sorted(keys)


@pytest.mark.parametrize("db, shape", [("lmdb_raw_32", (3, 32, 32)), ("lmdb_png_24x28", (3, 24, 28)),
                                       ("lmdb_gray_16", (1, 16, 16))])
def test_image_lmdbs(db, shape):
    arrays, labels, _ = read_all(IMAGES / db)
    assert len(arrays) == 24
    assert {a.shape for a in arrays} == {shape}
    assert labels == list_labels(IMAGES / "list.txt")


def test_encoded_lmdb_holds_the_original_files():
    names = [line.split()[0] for line in open(IMAGES / "list.txt")]
    arrays, labels, _ = read_all(IMAGES / "lmdb_encoded")
    assert labels == list_labels(IMAGES / "list.txt")
    for name, array in zip(names, arrays):
        rgb = np.asarray(Image.open(IMAGES / name).convert("RGB"))
        assert array.shape == (3,) + rgb.shape[:2]
        np.testing.assert_array_equal(array, rgb[:, :, ::-1].transpose(2, 0, 1))  # BGR


def test_encoded_shape_from_header_and_colour_flags():
    key, value = next(iter(iter_records(str(IMAGES / "lmdb_encoded"))))
    datum = parse_datum(value)
    c, h, w = datum_shape(datum)
    assert c == 3 and datum_to_array(datum).shape == (c, h, w)
    assert datum_shape(datum, force_gray=True) == (1, h, w)
    grey = datum_to_array(datum, force_gray=True)
    colour = datum_to_array(datum).astype(float)
    luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]
    assert grey.shape == (1, h, w) and np.abs(grey[0] - luma).max() <= 1.0
    with pytest.raises(ConfigError, match="force_color and force_gray"):
        datum_to_array(datum, force_color=True, force_gray=True)


def test_decode_bgr_and_grey_rules():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10   # blue
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "PNG")
    bgr = decode_image(out.getvalue())
    assert bgr.shape == (3, 4, 5) and (bgr[2] == 200).all() and (bgr[0] == 10).all()
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = io.BytesIO()
    Image.fromarray(grey, "L").save(out, "PNG")
    np.testing.assert_array_equal(decode_image(out.getvalue()), grey[None])
    colour = decode_image(out.getvalue(), force_color=True)
    assert colour.shape == (3, 4, 5) and all((colour[i] == grey).all() for i in range(3))


def test_datum_round_trips():
    rs = np.random.default_rng(0)
    pixels = rs.integers(0, 256, (3, 6, 7), dtype=np.uint8)
    array, label = decode_datum(encode_datum(pixels, 7))
    np.testing.assert_array_equal(array, pixels)
    assert label == 7
    values = rs.standard_normal((2, 3, 4)).astype(np.float32)
    array, label = decode_datum(encode_datum(values, 3))
    np.testing.assert_array_equal(array, values)
    assert array.dtype == np.float32 and label == 3
    datum = array_to_datum(pixels, 1, encode="png")
    assert datum.encoded and datum.data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(datum_to_array(datum), pixels)
    smooth = np.broadcast_to(np.linspace(0, 255, 7).astype(np.uint8), (3, 6, 7)).copy()
    jpeg = decode_image(encode_image(smooth, "jpg"))
    assert np.abs(jpeg.astype(int) - smooth).max() <= 8


@pytest.mark.parametrize("datum, message", [
    (pb.Datum(channels=1, height=2, width=2, data=b"\x00" * 3), "holds 3 bytes"),
    (pb.Datum(channels=1, height=2, width=2), "holds no data"),
    (pb.Datum(channels=1, height=2, width=2, float_data=[1.0]), "1 float values"),
    (pb.Datum(encoded=True, data=b"not an image"), "cannot decode"),
    (pb.Datum(encoded=True), "no image bytes"),
])
def test_corrupt_records_name_key_and_database(datum, message):
    with pytest.raises(DataError, match=message) as info:
        datum_to_array(datum, key=b"00000042", source="some_lmdb")
    assert "'00000042'" in str(info.value) and "'some_lmdb'" in str(info.value)


def test_unparseable_record():
    with pytest.raises(DataError, match="is not a Datum"):
        parse_datum(b"\xff\xff\xff", key=b"k", source="db")


def test_binaryproto_mean():
    mean = read_binaryproto(str(IMAGES / "mean_32.binaryproto"))
    assert mean.shape == (1, 3, 32, 32) and mean.dtype == np.float32
    # compute_image_mean's logged per-channel means (convert.log)
    np.testing.assert_allclose(mean[0].mean(axis=(1, 2)), [131.931, 123.058, 128.144], atol=1e-3)
    assert read_mean(str(IMAGES / "mean_32.binaryproto")).shape == (3, 32, 32)


def test_binaryproto_write_is_legacy_and_atomic(tmp_path):
    path = tmp_path / "mean.binaryproto"
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_binaryproto(str(path), values)
    proto = pb.BlobProto()
    proto.ParseFromString(path.read_bytes())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 2, 3, 4)
    assert not proto.HasField("shape")
    np.testing.assert_array_equal(read_mean(str(path)), values)
    write_binaryproto(str(path), values * 2)
    np.testing.assert_array_equal(read_binaryproto(str(path))[0], values * 2)
    assert os.listdir(tmp_path) == ["mean.binaryproto"]
    with pytest.raises(DataError, match="does not exist"):
        read_binaryproto(str(tmp_path / "missing.binaryproto"))


def records(n, tag=b""):
    for i in range(n):
        yield b"%08d" % i, encode_datum(np.full((1, 2, 2), i % 256, np.uint8), i) + tag


def test_write_lmdb_replaces_atomically(tmp_path):
    db = tmp_path / "db"
    assert write_lmdb(str(db), records(2500), commit_every=1000) == 2500
    assert count_records(str(db)) == 2500
    assert write_lmdb(str(db), records(5)) == 5
    assert count_records(str(db)) == 5

    def crashing():
        yield from records(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_lmdb(str(db), crashing())
    assert count_records(str(db)) == 5  # the previous database survives
    assert sorted(os.listdir(tmp_path)) == ["db"]  # no temporary folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an LMDB"):
        write_lmdb(str(tmp_path / "other"), records(1))


def test_reader_strides_and_wraps(tmp_path):
    db = tmp_path / "db"
    write_lmdb(str(db), records(7))
    reader = LMDBReader(str(db))
    labels = lambda recs: [parse_datum(v).label for _, v in recs]  # noqa: E731
    assert labels(reader.read(0, 5)) == [0, 1, 2, 3, 4]
    assert labels(reader.read(5, 4)) == [5, 6, 0, 1]
    assert labels(reader.read(1, 4, stride=2)) == [1, 3, 5, 0]
    assert labels(reader.read(30, 2)) == [2, 3]  # 30 % 7
    assert reader.first()[0] == b"00000000"
    reader.close()


def test_missing_or_bad_lmdb(tmp_path):
    with pytest.raises(DataError, match="does not exist.*get_mnist.py or caffelite convert_imageset"):
        LMDBReader(str(tmp_path / "nothing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is not an LMDB"):
        LMDBReader(str(tmp_path / "plain"))
    write_lmdb(str(tmp_path / "empty"), [])
    with pytest.raises(DataError, match="holds no records"):
        LMDBReader(str(tmp_path / "empty"))
