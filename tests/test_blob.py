"""Blob: shape, reshape reusing capacity, sharing, and the CPU/GPU head bookkeeping.

The GPU side is exercised with a stand-in for cupy whose arrays live in host
memory, so the synchronisation logic is tested on machines without a GPU.
"""
import numpy as np
import pytest

from caffelite import backend
from caffelite.backend import Device
from caffelite.blob import HEAD_CPU, HEAD_GPU, SYNCED, UNINIT, Blob
from caffelite.errors import ConfigError


def test_shape_count_and_axes():
    blob = Blob((2, 3, 4, 5))
    assert blob.shape == (2, 3, 4, 5) and blob.count == 120 and blob.num_axes == 4
    assert blob.count_range(1) == 60 and blob.count_range(1, 3) == 12
    assert blob.canonical_axis(-1) == 3
    with pytest.raises(ConfigError):
        blob.canonical_axis(4)
    assert Blob(()).count == 1


def test_reshape_reuses_capacity_and_keeps_values():
    blob = Blob((4, 5))
    blob.data[...] = np.arange(20).reshape(4, 5)
    memory = blob._data
    blob.reshape((2, 5))
    assert blob._data is memory
    np.testing.assert_array_equal(blob.data, np.arange(10).reshape(2, 5))
    blob.reshape((4, 5))
    assert blob._data is memory
    blob.reshape((5, 5))
    assert blob._data is not memory


def test_negative_dimension_is_an_error():
    with pytest.raises(ConfigError, match="negative"):
        Blob((2, -1))


def test_share_data_and_diff():
    a, b = Blob((2, 3)), Blob((3, 2))
    a.data[...] = 7
    b.share_data(a)
    assert np.all(b.data == 7) and b.shape == (3, 2)
    b.data[0, 0] = 1
    assert a.data[0, 0] == 1
    b.share_diff(a)
    a.diff[...] = 2
    assert np.all(b.diff == 2)
    with pytest.raises(ConfigError):
        Blob((4,)).share_data(a)


def test_assign_checks_shape_and_casts():
    blob = Blob((2, 2))
    blob.data = np.ones((2, 2), np.float64)
    assert blob.data.dtype == np.float32
    with pytest.raises(ConfigError, match="shape"):
        blob.data = np.ones(3)


class FakeCupyArray(np.ndarray):
    """A host array standing in for cupy.ndarray (``get``/``set`` copy to and from NumPy)."""

    def get(self, out=None):
        if out is None:
            return np.asarray(self).copy()
        out[...] = np.asarray(self)
        return out

    def set(self, values):
        np.asarray(self)[...] = values


class FakeCupy:
    copies = 0

    class cuda:  # noqa: N801 - mirrors cupy's layout
        class Device:
            def __init__(self, i):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def use(self):
                pass

    @staticmethod
    def zeros(n, dtype):
        return np.zeros(n, dtype).view(FakeCupyArray)

    @staticmethod
    def asarray(values):
        return np.asarray(values).view(FakeCupyArray)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    return Device.gpu(0)


def test_heads_move_only_when_the_other_side_is_read(fake_gpu):
    blob = Blob((3,), device=fake_gpu)
    assert blob.data_head == UNINIT
    blob.mutable_cpu_data()[...] = [1, 2, 3]
    assert blob.data_head == HEAD_CPU
    gpu = blob.gpu_data()  # copies to the device
    assert blob.data_head == SYNCED and list(np.asarray(gpu)) == [1, 2, 3]
    blob.data[...] = 5  # ``data`` is the GPU side on a GPU blob, and a write
    assert blob.data_head == HEAD_GPU
    np.testing.assert_array_equal(blob.cpu_data(), 5)
    assert blob.data_head == SYNCED


def test_move_between_devices_keeps_values(fake_gpu):
    blob = Blob((2, 2))
    blob.data[...] = 3
    blob.to(fake_gpu)
    assert blob.device == fake_gpu
    np.testing.assert_array_equal(blob.cpu_data(), 3)
