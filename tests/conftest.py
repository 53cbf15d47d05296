"""Shared test settings: where the real-Caffe golden files and the data live."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "caffe"
MNIST_DIR = SHARED / "data" / "mnist"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
