"""caffelite compute_image_mean against Caffe's mean_32.binaryproto and convert.log."""
import re

import lmdb
import numpy as np
import pytest
from conftest import FIXTURES

from caffelite.cli import main
from caffelite.data.datum import datum_to_array
from caffelite.data.lmdb_source import write_lmdb
from caffelite.io.binaryproto import read_binaryproto
from caffelite.proto import pb

IMAGES = FIXTURES / "images"


def arrays(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            out = []
            for _, value in txn.cursor():
                d = pb.Datum()
                d.ParseFromString(value)
                out.append(datum_to_array(d).astype(np.float64))
            return out
    finally:
        env.close()


def channel_lines(text):
    return re.findall(r"mean_value channel \[\d+\]: [\d.]+", text)


def test_mean_of_raw_db_is_caffes(tmp_path, capsys):
    out = tmp_path / "mean.binaryproto"
    assert main(["compute_image_mean", str(IMAGES / "lmdb_raw_32"), str(out)]) == 0
    ours, theirs = read_binaryproto(str(out)), read_binaryproto(str(IMAGES / "mean_32.binaryproto"))
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)
    err = capsys.readouterr().err
    expected = channel_lines((IMAGES / "convert.log").read_text())
    assert len(expected) == 3 and channel_lines(err) == expected
    for line in ("Starting iteration", "Processed 24 files.", f"Write to {out}", "Number of channels: 3"):
        assert line in err


def test_without_output_file_only_logs(tmp_path, capsys):
    assert main(["compute_image_mean", "-backend", "lmdb", str(IMAGES / "lmdb_gray_16")]) == 0
    err = capsys.readouterr().err
    expected = np.mean(arrays(IMAGES / "lmdb_gray_16"), axis=0).mean()
    assert channel_lines(err) == [f"mean_value channel [0]: {expected:g}"]
    assert "Write to" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_encoded_records_are_decoded(tmp_path, workers):
    out = tmp_path / "mean.binaryproto"
    assert main(["compute_image_mean", "--workers", workers, str(IMAGES / "lmdb_png_24x28"), str(out)]) == 0
    expected = np.mean(arrays(IMAGES / "lmdb_png_24x28"), axis=0)
    np.testing.assert_allclose(read_binaryproto(str(out))[0], expected, rtol=1e-6)


def test_float_records(tmp_path):
    db = FIXTURES / "net" / "features" / "conv_a"
    out = tmp_path / "mean.binaryproto"
    assert main(["compute_image_mean", str(db), str(out)]) == 0
    np.testing.assert_allclose(read_binaryproto(str(out))[0], np.mean(arrays(db), axis=0), rtol=1e-5, atol=1e-6)


def test_records_of_different_sizes(tmp_path, capsys):
    out = tmp_path / "mean.binaryproto"
    assert main(["compute_image_mean", str(IMAGES / "lmdb_encoded"), str(out)]) == 3
    err = capsys.readouterr().err
    assert "record '00000001_circle/img_01.jpg'" in err and "is 3x46x45 but record '00000000_square/img_00.png' is 3x45x24" in err
    assert "--resize_height" in err
    assert not out.exists()


def test_bad_databases(tmp_path, capsys):
    assert main(["compute_image_mean", str(tmp_path / "nope"), str(tmp_path / "m.binaryproto")]) == 3
    assert "does not exist" in capsys.readouterr().err
    write_lmdb(str(tmp_path / "empty"), [])
    assert main(["compute_image_mean", str(tmp_path / "empty")]) == 3
    assert "holds no records" in capsys.readouterr().err
    assert main(["compute_image_mean", "--backend", "leveldb", str(IMAGES / "lmdb_raw_32")]) == 2
    assert "LevelDB is not supported" in capsys.readouterr().err
