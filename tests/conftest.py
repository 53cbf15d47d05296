"""Shared test settings: where the real-Caffe golden files and the data live."""
import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "caffe"
MNIST_DIR = SHARED / "data" / "mnist"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _reset_caffelite_logger():
    """The CLI installs its own handler and stops propagation; undo that after each test
    so pytest's caplog keeps seeing caffelite's records."""
    yield
    logger = logging.getLogger("caffelite")
    for handler in [h for h in logger.handlers if getattr(h, "_caffelite", False)]:
        logger.removeHandler(handler)
    logger.propagate = True


@pytest.fixture(params=[1, 3])
def cpu_parts(request, monkeypatch):
    """Layers that split their CPU work into parts on several threads (cpu_threads.py) run
    once in one part and once in parts on three threads, however small the work. Use as
    ``pytestmark = pytest.mark.usefixtures("cpu_parts")``; the value is the thread count."""
    from caffelite.layers import cpu_threads  # noqa: PLC0415

    monkeypatch.setattr(cpu_threads, "cpu_threads", lambda: request.param)
    monkeypatch.setattr(cpu_threads, "MIN_PART_ELEMENTS", 1 if request.param > 1 else 1 << 40)
    return request.param


# ---- devices: the same test body on the CPU and on a GPU ----------------------------------------
def gpu_ready() -> bool:
    """CuPy imports and sees a CUDA device (never imports CuPy when it is not installed)."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("cupy") is None:
        return False
    from caffelite.backend import gpu_available  # noqa: PLC0415

    return gpu_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CuPy and a CUDA GPU (skipped cleanly without them)")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request):
    """A caffelite Device: ``cpu``, then ``gpu`` (GPU 0), which is skipped without CuPy or a GPU."""
    from caffelite.backend import CPU, Device  # noqa: PLC0415

    if request.param == "gpu":
        if not gpu_ready():
            pytest.skip("no GPU: CuPy is not installed or no CUDA device is visible")
        return Device.gpu(0)
    return CPU


@pytest.fixture
def logs():
    """The messages caffelite logs at INFO and above during the test, as plain strings."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("caffelite")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)
