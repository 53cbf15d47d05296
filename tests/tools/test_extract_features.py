"""caffelite extract_features against the feature LMDBs real Caffe extracted from fixtures/net."""
import lmdb
import numpy as np
import pytest
from conftest import FIXTURES

from caffelite.cli import main
from caffelite.proto import pb
from caffelite.tools.extract_features import legacy_shape

NET = FIXTURES / "net"
WEIGHTS = str(NET / "fixture_iter_20.caffemodel")
PROTOTXT = str(NET / "net.prototxt")
# 4-D, 4-D after crop, 2-D, 1-D labels, 0-d loss: every legacy shape rule.
BLOBS = ["data", "crop", "ip_a", "label", "loss"]


def datums(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            out = {}
            for key, value in txn.cursor():
                d = pb.Datum()
                d.ParseFromString(value)
                out[bytes(key)] = d
            return out
    finally:
        env.close()


def extract(blobs, dbs, *rest):
    return main(["extract_features", WEIGHTS, PROTOTXT, ",".join(blobs), ",".join(map(str, dbs)), *rest])


def test_reproduces_caffe_features(tmp_path, capsys):
    dbs = [tmp_path / name for name in BLOBS]
    assert extract(BLOBS, dbs, "2", "lmdb", "CPU") == 0
    for name, db in zip(BLOBS, dbs):
        theirs, ours = datums(NET / "features" / name), datums(db)
        assert list(ours) == list(theirs), name
        assert list(ours)[:2] == [b"0000000000", b"0000000001"]
        for key, a in theirs.items():
            b = ours[key]
            assert [f.name for f, _ in b.ListFields()] == [f.name for f, _ in a.ListFields()]
            assert (b.channels, b.height, b.width) == (a.channels, a.height, a.width), (name, key)
            x, y = np.array(a.float_data), np.array(b.float_data)
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * np.abs(x).max(), err_msg=f"{name} {key}")
    err = capsys.readouterr().err
    assert "Extracted features of 8 query images for feature blob crop" in err
    assert "Extracted features of 2 query images for feature blob loss" in err
    assert "Successfully extracted the features!" in err


def test_legacy_shape():
    assert legacy_shape(()) == (1, 1, 1, 1)
    assert legacy_shape((4,)) == (4, 1, 1, 1)
    assert legacy_shape((4, 7)) == (4, 7, 1, 1)
    assert legacy_shape((4, 3, 5)) == (4, 3, 5, 1)
    assert legacy_shape((4, 3, 5, 6, 2)) == (4, 3, 5, 12)


def test_unknown_blob_leaves_no_database(tmp_path, capsys):
    assert extract(["ip_a", "conv_aa"], [tmp_path / "a", tmp_path / "b"], "1", "lmdb") == 2
    err = capsys.readouterr().err
    assert "unknown feature blob name 'conv_aa'" in err and "did you mean 'conv_a'?" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("blobs, dbs, rest, message", [
    (["ip_a", "loss"], ["a"], ["1", "lmdb"], "2 blob names but 1 databases"),
    (["ip_a"], ["a"], ["0", "lmdb"], "NUM_BATCHES must be at least 1"),
    (["ip_a"], ["a"], ["x", "lmdb"], "NUM_BATCHES 'x' is not a number"),
    (["ip_a"], ["a"], ["1", "leveldb"], "LevelDB is not supported"),
    (["ip_a"], ["a"], ["1", "lmdb", "TPU"], "unknown mode 'TPU'"),
])
def test_bad_arguments(tmp_path, capsys, blobs, dbs, rest, message):
    assert extract(blobs, [tmp_path / d for d in dbs], *rest) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_existing_database_needs_force(tmp_path, capsys):
    db = tmp_path / "ip"
    assert extract(["ip_a"], [db], "1", "lmdb") == 0
    assert len(datums(db)) == 4
    assert extract(["ip_a"], [db], "2", "lmdb") == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert len(datums(db)) == 4
    assert extract(["ip_a"], [db], "2", "lmdb", "--force") == 0
    assert len(datums(db)) == 8
