"""scripts/get_mnist.py: offline conversion equals real Caffe's MNIST LMDBs."""
import gzip
import hashlib
import importlib.util
import struct

import pytest

from conftest import FIXTURES, MNIST_DIR, REPO
from test_download import LoopbackServer, go_offline
from caffelite.data.lmdb_source import iter_records
from caffelite.proto import pb

spec = importlib.util.spec_from_file_location("get_mnist", REPO / "scripts" / "get_mnist.py")
get_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(get_mnist)


def datums(db):
    for _, value in iter_records(str(db)):
        d = pb.Datum()
        d.ParseFromString(value)
        yield d


def test_from_local_files_matches_caffe(tmp_path, capsys):
    assert get_mnist.main(["--from", str(MNIST_DIR), "--out", str(tmp_path)]) == 0
    assert "wrote 8000 records" in capsys.readouterr().out
    for split, count in (("train", 8000), ("test", 2000)):
        ours = list(datums(tmp_path / f"mnist_{split}_lmdb"))
        caffe = list(datums(FIXTURES / "mnist" / f"mnist_{split}_lmdb"))
        assert len(ours) == len(caffe) == count
        for a, b in zip(ours, caffe):
            assert (a.channels, a.height, a.width, a.label) == (b.channels, b.height, b.width, b.label)
            assert a.data == b.data and not a.encoded
    keys = [k for k, _ in iter_records(str(tmp_path / "mnist_test_lmdb"))]
    assert keys[:2] == [b"00000000", b"00000001"]
    # Re-running replaces the databases in place.
    assert get_mnist.main(["--from", str(MNIST_DIR), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist_test_lmdb", "mnist_train_lmdb"]


def test_offline_download_fails_clearly(tmp_path, monkeypatch, capsys):
    tried = go_offline(monkeypatch)
    assert get_mnist.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "--from DIR" in err and "Temporary failure" in err
    assert tried == [mirror + "train-images-idx3-ubyte.gz" for mirror in get_mnist.MIRRORS]  # no retries
    assert not any(tmp_path.iterdir())  # no database, no partial file, no lock


def test_download_tries_the_mirrors_and_keeps_a_verified_file(tmp_path, monkeypatch, capsys):
    name = "t10k-labels-idx1-ubyte.gz"
    good = gzip.compress(struct.pack(">2I", 2049, 3) + bytes([1, 2, 3]))
    with LoopbackServer({f"/bad/{name}": b"not it", f"/good/{name}": good}) as srv:
        monkeypatch.setattr(get_mnist, "MIRRORS", (f"{srv.base}/gone/", f"{srv.base}/bad/", f"{srv.base}/good/"))
        monkeypatch.setitem(get_mnist.MD5, name, {"0" * 32, hashlib.md5(good).hexdigest()})  # either one
        assert get_mnist.download(name, tmp_path) == tmp_path / name
        assert capsys.readouterr().out == f"downloaded {srv.base}/good/{name}\n"
        assert (tmp_path / name).read_bytes() == good and sorted(tmp_path.iterdir()) == [tmp_path / name]
        srv.requests.clear()
        get_mnist.download(name, tmp_path)
        assert "present, checksum OK" in capsys.readouterr().out and srv.requests == []


def write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload)


@pytest.mark.parametrize("images, message", [
    ((2049, (2, 28, 28), bytes(2 * 784)), "magic number 2049"),
    ((2051, (2, 28, 28), bytes(784)), "header declares 1568"),
    ((2051, (2, 28, 28), bytes(3 * 784)), "more than 1568"),
    ((2051, (2, 32, 32), bytes(2 * 1024)), "28 x 28"),
])
def test_bad_idx_files(tmp_path, capsys, images, message):
    src = tmp_path / "src"
    src.mkdir()
    write_idx(src / "t10k-images-idx3-ubyte.gz", *images)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", 2049, (2,), bytes(2))
    assert get_mnist.main(["--from", str(src), "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
