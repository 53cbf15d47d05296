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
