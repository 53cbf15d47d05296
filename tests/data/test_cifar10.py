"""scripts/get_cifar10.py on fake binary batches, and the configs/cifar10 nets and solvers."""
import importlib.util
import io
import tarfile

import numpy as np
import pytest

from conftest import REPO
from test_download import LoopbackServer, go_offline
from caffelite import config
from caffelite.data.lmdb_source import iter_records
from caffelite.io.binaryproto import read_mean
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net
from caffelite.proto import pb

spec = importlib.util.spec_from_file_location("get_cifar10", REPO / "scripts" / "get_cifar10.py")
get_cifar10 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(get_cifar10)
CONFIGS = REPO / "configs" / "cifar10"
NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def fake_batches(folder, per_file=3, seed=0):
    """The real record format: label byte, then 1024 R, 1024 G, 1024 B bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    content = {}
    for name in NAMES:
        records = rng.integers(0, 256, (per_file, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, per_file)
        (folder / name).write_bytes(records.tobytes())
        content[name] = records
    return content


def datums(db):
    out = []
    for key, value in iter_records(str(db)):
        d = pb.Datum()
        d.ParseFromString(value)
        out.append((key, d))
    return out


def check_output(out, content):
    train = datums(out / "cifar10_train_lmdb")
    assert [k for k, _ in train] == [b"%05d" % (f * 10000 + i) for f in range(5) for i in range(3)]
    records = np.concatenate([content[n] for n in NAMES[:5]])
    for (_, d), record in zip(train, records):
        assert (d.channels, d.height, d.width, d.label) == (3, 32, 32, record[0]) and not d.encoded
        assert d.data == record[1:].tobytes()  # the file's bytes, R plane first, as Caffe stores them
    test = datums(out / "cifar10_test_lmdb")
    assert [k for k, _ in test] == [b"00000", b"00001", b"00002"]
    assert [d.data for _, d in test] == [r[1:].tobytes() for r in content["test_batch.bin"]]
    mean = read_mean(str(out / "mean.binaryproto"))
    expected = (records[:, 1:].astype(np.int64).sum(0).astype(np.float32) / np.float32(15)).reshape(3, 32, 32)
    assert mean.shape == (3, 32, 32) and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, expected)


def test_from_local_bin_files(tmp_path, capsys):
    content = fake_batches(tmp_path / "src" / "cifar-10-batches-bin")
    assert get_cifar10.main(["--from", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 15 records" in printed and "wrote 3 records" in printed and "per-channel means" in printed
    check_output(tmp_path / "out", content)
    # Running again replaces everything in place.
    assert get_cifar10.main(["--from", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cifar10_test_lmdb", "cifar10_train_lmdb", "mean.binaryproto"]


def test_from_the_archive_with_a_checksum_warning(tmp_path, capsys):
    content = fake_batches(tmp_path / "cifar-10-batches-bin")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    assert get_cifar10.main(["--from", str(archive), "--out", str(tmp_path / "out")]) == 0
    assert "does not have the published MD5" in capsys.readouterr().err
    check_output(tmp_path / "out", content)


def add_member(tar, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("name, kind, link, message", [
    ("../evil.bin", tarfile.REGTYPE, "", "would be written outside"),
    ("/abs/outside.bin", tarfile.REGTYPE, "", "would be written outside"),
    ("cifar-10-batches-bin/test_batch.bin", tarfile.SYMTYPE, "/etc/passwd", "not a regular file"),
])
def test_unsafe_archives_are_refused(tmp_path, capsys, name, kind, link, message):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-bin/data_batch_1.bin", bytes(3073))
        add_member(tar, name, b"y" * 3073, kind, link)
    assert get_cifar10.main(["--from", str(archive), "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "evil.bin").exists() and not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path, capsys):
    src = tmp_path / "src"
    fake_batches(src)
    (src / "data_batch_3.bin").unlink()
    assert get_cifar10.main(["--from", str(src), "--out", str(tmp_path / "out")]) != 0
    assert "lacks data_batch_3.bin" in capsys.readouterr().err
    fake_batches(src)
    (src / "test_batch.bin").write_bytes(bytes(3073 * 2 + 5))
    assert get_cifar10.main(["--from", str(src), "--out", str(tmp_path / "out")]) != 0
    assert "6151 bytes, not a whole number of 3073-byte" in capsys.readouterr().err
    (src / "test_batch.bin").write_bytes(bytes([12]) + bytes(3072))
    assert get_cifar10.main(["--from", str(src), "--out", str(tmp_path / "out")]) != 0
    assert "label 12" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offline_download_fails_clearly(tmp_path, monkeypatch, capsys):
    tried = go_offline(monkeypatch)
    assert get_cifar10.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "--from DIR" in err and get_cifar10.URL in err
    assert tried == [get_cifar10.URL]  # an unknown host is not retried
    assert not any(tmp_path.iterdir())  # no database, no partial file, no lock


def test_download_with_the_wrong_md5_is_deleted(tmp_path, monkeypatch, capsys):
    with LoopbackServer({"/cifar-10-binary.tar.gz": b"not the archive"}) as srv:
        monkeypatch.setattr(get_cifar10, "URL", f"{srv.base}/cifar-10-binary.tar.gz")
        assert get_cifar10.main(["--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"md5 expected {get_cifar10.MD5}" in err and "run the script again" in err
    assert not any(tmp_path.iterdir())


# ---- configs/cifar10 -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    fake_batches(root / "src", per_file=4)
    assert get_cifar10.main(["--from", str(root / "src"), "--out", str(root / "out")]) == 0
    return root / "out"


def build(name, phase, data_dir, batch=4):
    param = config.load_net(CONFIGS / name)
    for layer in param.layer:
        if layer.type == "Data":
            split = "train" if "train" in layer.data_param.source else "test"
            assert layer.data_param.source.endswith(f"data/cifar10/cifar10_{split}_lmdb")
            assert layer.transform_param.mean_file.endswith("data/cifar10/mean.binaryproto")
            layer.data_param.source = str(data_dir / f"cifar10_{split}_lmdb")
            layer.data_param.batch_size = batch
            layer.transform_param.mean_file = str(data_dir / "mean.binaryproto")
    return Net(param, phase=phase, seed=1)


@pytest.mark.parametrize("name, params, shapes", [
    ("cifar10_quick_train_test.yaml", 145_578,
     {"conv1": (32, 32, 32), "pool1": (32, 16, 16), "conv2": (32, 16, 16), "pool2": (32, 8, 8),
      "conv3": (64, 8, 8), "pool3": (64, 4, 4), "ip1": (64,), "ip2": (10,)}),
    ("cifar10_full_train_test.yaml", 89_578,
     {"pool1": (32, 16, 16), "norm1": (32, 16, 16), "pool2": (32, 8, 8), "norm2": (32, 8, 8),
      "pool3": (64, 4, 4), "ip1": (10,)}),
])
def test_nets_build_and_run(cifar_data, name, params, shapes):
    for phase in (TRAIN, TEST):
        net = build(name, phase, cifar_data)
        try:
            loss = net.forward()
            assert sum(p.count for p in net.learnable_params) == params
            for blob, shape in shapes.items():
                assert net.blobs[blob].shape == (4,) + shape
            assert net.blobs["data"].shape == (4, 3, 32, 32)
            assert np.isfinite(loss) and abs(loss - np.log(10)) < 0.5  # small random init
            assert ("accuracy" in net.blobs) == (phase == TEST)
        finally:
            net.close()


def test_full_net_decay_and_lrn_settings():
    param = config.load_net(CONFIGS / "cifar10_full_train_test.yaml")
    layers = {layer.name: layer for layer in param.layer}
    assert [(p.lr_mult, p.decay_mult) for p in layers["ip1"].param] == [(1, 250), (2, 0)]
    for norm in ("norm1", "norm2"):
        lrn = layers[norm].lrn_param
        assert (lrn.local_size, lrn.beta, lrn.norm_region) == (3, 0.75, pb.LRNParameter.WITHIN_CHANNEL)
        assert lrn.alpha == pytest.approx(5e-05)
    assert layers["conv1"].convolution_param.weight_filler.std == pytest.approx(0.0001)


@pytest.mark.parametrize("name, net, lr, max_iter, snapshot, interval", [
    ("cifar10_quick_solver.yaml", "cifar10_quick_train_test.yaml", 0.001, 4000, 4000, 500),
    ("cifar10_quick_solver_lr1.yaml", "cifar10_quick_train_test.yaml", 0.0001, 5000, 5000, 500),
    ("cifar10_full_solver.yaml", "cifar10_full_train_test.yaml", 0.001, 60000, 10000, 1000),
    ("cifar10_full_solver_lr1.yaml", "cifar10_full_train_test.yaml", 0.0001, 65000, 5000, 1000),
    ("cifar10_full_solver_lr2.yaml", "cifar10_full_train_test.yaml", 0.00001, 70000, 5000, 1000),
])
def test_solvers(name, net, lr, max_iter, snapshot, interval):
    s = config.load_solver(CONFIGS / name)
    assert s.net == str(CONFIGS / net)
    assert s.base_lr == pytest.approx(lr) and s.lr_policy == "fixed"
    assert (s.momentum, s.max_iter, s.snapshot, s.test_interval, list(s.test_iter)) == (
        pytest.approx(0.9), max_iter, snapshot, interval, [100])
    assert s.weight_decay == pytest.approx(0.004)
    assert s.snapshot_format == pb.SolverParameter.HDF5
    assert s.snapshot_prefix.endswith("runs/cifar10/" + name.split("_solver")[0])
