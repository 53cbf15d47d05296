"""The decode worker pool: same batches as one worker, in order, exact resume, errors, shutdown."""
import gc
import threading
import time

import numpy as np
import pytest

from conftest import FIXTURES
from layer_testing import forward, make_layer, setup
from caffelite.data.prefetch import WORKERS_ENV, Prefetcher, default_workers
from caffelite.errors import ConfigError, DataError
from caffelite.layers.base import TRAIN

IMAGES = FIXTURES / "images"
PNG_DB = str(IMAGES / "lmdb_png_24x28")  # encoded PNGs, all 24 x 28


def data_layer(monkeypatch, workers, prefetch=4, seed=7):
    monkeypatch.setenv(WORKERS_ENV, str(workers))
    layer = make_layer("Data", phase=TRAIN, seed=seed, dtype=np.float32,
                       data_param={"source": PNG_DB, "batch_size": 5, "backend": "LMDB",
                                   "prefetch": prefetch},
                       transform_param={"crop_size": 20, "mirror": True, "mean_value": [100, 110, 120]})
    _, top = setup(layer, [], 2)
    return layer, top


def run(layer, top, k):
    return [forward(layer, [], top) for _ in range(k)]


def test_any_number_of_workers_gives_the_same_batches(monkeypatch):
    layers = [data_layer(monkeypatch, w, prefetch=p) for w, p in ((1, 1), (2, 4), (3, 2))]
    try:
        assert [layer.workers for layer, _ in layers] == [1, 2, 3]
        assert [len(layer._prefetcher._threads) for layer, _ in layers] == [1, 2, 3]
        outs = [run(layer, top, 7) for layer, top in layers]  # 35 items: wraps around the 24 records
        for other in outs[1:]:
            for want, got in zip(outs[0], other):
                np.testing.assert_array_equal(want[0], got[0])
                np.testing.assert_array_equal(want[1], got[1])
        assert np.concatenate([o[1] for o in outs[0]]).tolist() == [i % 24 % 2 for i in range(35)]
    finally:
        for layer, _ in layers:
            layer.close()


def test_image_data_workers_agree(monkeypatch):
    outs = []
    for workers in (1, 3):
        monkeypatch.setenv(WORKERS_ENV, str(workers))
        layer = make_layer("ImageData", phase=TRAIN, seed=2, dtype=np.float32, image_data_param={
            "source": str(IMAGES / "list.txt"), "root_folder": str(IMAGES), "batch_size": 4,
            "shuffle": True, "new_height": 20, "new_width": 20}, transform_param={"crop_size": 16, "mirror": True})
        _, top = setup(layer, [], 2)
        try:
            outs.append(run(layer, top, 8))
        finally:
            layer.close()
    for want, got in zip(*outs):
        np.testing.assert_array_equal(want[0], got[0])
        np.testing.assert_array_equal(want[1], got[1])


def test_exact_resume_with_workers(monkeypatch):
    a, top_a = data_layer(monkeypatch, 3)
    b, top_b = data_layer(monkeypatch, 2, seed=1)
    try:
        run(a, top_a, 4)
        state = a.state_dict()
        expected = run(a, top_a, 5)
        run(b, top_b, 2)
        b.load_state_dict(state)
        for want, got in zip(expected, run(b, top_b, 5)):
            np.testing.assert_array_equal(want[0], got[0])
            np.testing.assert_array_equal(want[1], got[1])
    finally:
        a.close()
        b.close()


def test_the_top_keeps_its_batch_while_workers_run_ahead(monkeypatch):
    layer, top = data_layer(monkeypatch, 2, prefetch=2)
    try:
        forward(layer, [], top)
        held = top[0].cpu_data()
        assert np.shares_memory(held, layer._current.data)  # handed over without a copy, as Caffe 1.0
        snapshot = held.copy()
        time.sleep(0.2)  # the workers fill every free buffer meanwhile
        np.testing.assert_array_equal(top[0].cpu_data(), snapshot)
    finally:
        layer.close()


def test_batches_come_in_order_from_several_threads():
    seen = {}

    def load(index, batch):
        time.sleep(0.03 if index % 3 == 0 else 0.001)  # later batches finish first
        seen[index] = (threading.current_thread().name, batch.worker)
        batch.data = np.full(2, index)

    prefetcher = Prefetcher(load, depth=4, workers=3, name="order")
    try:
        for i in range(12):
            batch = prefetcher.next()
            assert batch.index == i and (batch.data == i).all()
            prefetcher.release(batch)
    finally:
        prefetcher.close()
    assert len({name for name, _ in seen.values()}) == 3
    assert {worker for _, worker in seen.values()} == {0, 1, 2}
    assert not prefetcher.alive


def test_error_in_one_worker_arrives_in_order_and_stops_the_pool():
    def load(index, batch):
        if index == 5:
            raise DataError("broken record 5")
        time.sleep(0.01)
        batch.data = np.full(1, index)

    prefetcher = Prefetcher(load, depth=3, workers=3)
    for i in range(5):  # the batches before the failed one still come, in order
        batch = prefetcher.next()
        assert batch.index == i
        prefetcher.release(batch)
    with pytest.raises(DataError, match="broken record 5") as first:
        prefetcher.next()
    with pytest.raises(DataError) as again:
        prefetcher.next()
    assert again.value is first.value
    deadline = time.time() + 5
    while prefetcher.alive and time.time() < deadline:  # no new batches are started
        time.sleep(0.01)
    assert not prefetcher.alive
    prefetcher.close()


def test_layer_error_with_workers_is_the_same_data_error(monkeypatch, tmp_path):
    from caffelite.data.datum import encode_datum
    from caffelite.data.lmdb_source import write_lmdb
    from caffelite.proto import pb

    good = encode_datum(np.zeros((1, 2, 2), np.uint8))
    bad = pb.Datum(channels=1, height=2, width=2, data=b"\x00").SerializeToString()
    db = str(tmp_path / "db")
    write_lmdb(db, [(b"%03d" % i, bad if i == 7 else good) for i in range(10)])
    monkeypatch.setenv(WORKERS_ENV, "3")
    layer = make_layer("Data", data_param={"source": db, "batch_size": 2, "backend": "LMDB"})
    _, top = setup(layer, [], 2)
    try:
        for _ in range(3):
            forward(layer, [], top)
        for _ in range(2):
            with pytest.raises(DataError, match="record '007' of .* holds 1 bytes"):
                layer.forward([], top)
    finally:
        layer.close()


def test_close_and_collection_end_every_thread(monkeypatch):
    layer, top = data_layer(monkeypatch, 3)
    run(layer, top, 2)
    threads = list(layer._prefetcher._threads)
    layer.close()
    assert not any(t.is_alive() for t in threads) and not layer._readers
    with pytest.raises(ConfigError, match="closed"):
        layer.forward([], top)
    layer, top = data_layer(monkeypatch, 2)
    threads = list(layer._prefetcher._threads)
    del layer, top
    gc.collect()
    deadline = time.time() + 5
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in threads)


def test_worker_count_setting(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert 1 <= default_workers() <= 8
    monkeypatch.setenv(WORKERS_ENV, "5")
    assert default_workers() == 5
    for bad in ("0", "many"):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(ConfigError, match=f"{WORKERS_ENV}='{bad}' is not a positive integer"):
            default_workers()


def test_decoder_side_mirroring_equals_the_transformers(monkeypatch, tmp_path):
    """Encoded colour images are mirrored by the decoder; the result is what the
    plain transform of the decoded images gives, mean_file included."""
    from caffelite.data.datum import decode_image
    from caffelite.data.lmdb_source import iter_records
    from caffelite.data.transform import DataTransformer
    from caffelite.io.binaryproto import write_binaryproto
    from caffelite.proto import pb

    mean = np.random.default_rng(0).uniform(0, 255, (1, 3, 24, 28)).astype(np.float32)
    write_binaryproto(str(tmp_path / "mean.binaryproto"), mean)
    monkeypatch.setenv(WORKERS_ENV, "2")
    transform = {"crop_size": 20, "mirror": True, "mean_file": str(tmp_path / "mean.binaryproto"),
                 "scale": 0.5}
    layer = make_layer("Data", phase=TRAIN, seed=11, dtype=np.float32, transform_param=transform,
                       data_param={"source": PNG_DB, "batch_size": 6, "backend": "LMDB"})
    _, top = setup(layer, [], 2)
    images = []
    for _, value in iter_records(PNG_DB):
        d = pb.Datum()
        d.ParseFromString(value)
        images.append(decode_image(d.data))
    reference = DataTransformer(pb.TransformationParameter(**transform), TRAIN, np.float32)
    try:
        flips = 0
        for k in range(4):
            got = forward(layer, [], top)[0]
            rng = layer.batch_rng(k)
            batch = np.stack([images[(k * 6 + i) % 24] for i in range(6)])
            draw = reference.draw(6, batch.shape[1:], layer.batch_rng(k))
            flips += int(draw.flip.sum())
            np.testing.assert_array_equal(got, reference(batch, rng))
        assert 0 < flips < 24
    finally:
        layer.close()
