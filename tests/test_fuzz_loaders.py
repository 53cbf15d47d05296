"""Loaders under random and mutated input: they load, or raise caffelite's own error. Never
anything else. Also: the tree never unpickles or loads YAML unsafely."""
import io
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from caffelite.config import parse_net, parse_solver
from caffelite.data.datum import decode_datum, encode_datum
from caffelite.data.hdf5_source import HDF5Source
from caffelite.errors import CaffeliteError

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

NET_YAML = """name: LeNet
layer:
  - name: mnist
    type: Data
    top: [data, label]
    include: {phase: TRAIN}
    transform_param: {scale: 0.00390625, mirror: false}
    data_param: {source: mnist_train_lmdb, batch_size: 64, backend: LMDB}
  - {name: conv1, type: Convolution, bottom: data, top: conv1, param: [{lr_mult: 1}, {lr_mult: 2}],
     convolution_param: {num_output: 20, kernel_size: 5, weight_filler: {type: xavier}}}
  - {name: loss, type: SoftmaxWithLoss, bottom: [conv1, label], top: loss, loss_weight: 1}
"""
SOLVER_YAML = """net: lenet.yaml
test_iter: [100]
test_interval: 500
base_lr: 0.01
momentum: 0.9
lr_policy: inv
gamma: 0.0001
power: 0.75
stepvalue: [10, 20]
snapshot_format: HDF5
solver_mode: CPU
random_seed: -1
"""
YAML_PIECES = ["[", "]", "{", "}", ":", ": ", "-", "- ", ",", "\n", "  ", "\t", "&a ", "*a", "!!python/object:os.system ",
               "!!binary ", "!!float ", "? ", "|", ">", "'", '"', "#", "%YAML 1.1\n", "---\n", "...", "~", "null",
               "true", "yes", "1e400", "-1e400", ".nan", ".inf", "99999999999999999999", "-5", "0x10", "0o7",
               "2.5", "TRAIN", "MAX", "layer", "name", "bottom", "top", "dim", "num_output", "<<: *a", "\x00", "é"]


@st.composite
def mutated(draw, base: str, pieces=YAML_PIECES):
    """``base`` with a few random cuts, insertions and replacements."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        end = min(len(text), pos + draw(st.integers(0, 12)))
        insert = draw(st.one_of(st.sampled_from(pieces), st.text(max_size=6)))
        text = text[:pos] + insert + text[end:]
    return text


def either_loads_or_caffelite_error(fn, *args):
    try:
        fn(*args)
    except CaffeliteError as exc:
        assert str(exc)  # a message, one line is up to the formatter
    # anything else propagates and fails the test


@FUZZ
@given(st.one_of(st.text(max_size=200), mutated(NET_YAML)))
@example("a: &a [*a]")
@example("layer: [{name: x, type: Input, input_param: {shape: {dim: [99999999999999999999]}}}]")
@example("layer: !!python/object/apply:os.system ['true']")
@example("[" * 1100)
@example("force_backward: !!binary aGVsbG8=")
def test_random_and_mutated_net_yaml(text):
    either_loads_or_caffelite_error(parse_net, text)


@FUZZ
@given(st.one_of(st.text(max_size=200), mutated(SOLVER_YAML)))
@example("random_seed: 99999999999999999999999")
@example("max_iter: !!float 1e5")
@example("snapshot_format: 7")
def test_random_and_mutated_solver_yaml(text):
    either_loads_or_caffelite_error(parse_solver, text)


@FUZZ
@given(st.one_of(st.text(max_size=200), mutated(
    'name: "t"\nlayer { name: "a" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n',
    ["{", "}", ":", '"', "\n", "layer", "dim: ", "-1", "1e99", "#", "\\", "<", ">"])))
def test_random_and_mutated_prototxt(text):
    either_loads_or_caffelite_error(parse_net, text, "prototxt")


# ---- Datum bytes ---------------------------------------------------------------------------------------
def _image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (5, 4, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


RAW = encode_datum(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), label=3)
FLOAT = encode_datum(np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 3, 4), label=1)
ENCODED = [encode_datum(np.zeros((3, 5, 4), np.uint8), 2, encode=fmt) for fmt in ("png", "jpg")]
IMAGES = [_image_bytes(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF")]


@st.composite
def mutated_bytes(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:]
    return bytes(data)


def _encoded_datum_of(image: bytes) -> bytes:
    from caffelite.proto import pb

    return pb.Datum(channels=3, height=5, width=4, encoded=True, data=image, label=0).SerializeToString()


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated_bytes(RAW), mutated_bytes(FLOAT),
                 *[mutated_bytes(e) for e in ENCODED],
                 *[mutated_bytes(img).map(_encoded_datum_of) for img in IMAGES]),
       st.booleans(), st.booleans())
@example(b"\x08\xff\xff\xff\xff\x07\x10\xff\xff\xff\xff\x07\x18\xff\xff\xff\xff\x07", False, False)
def test_random_and_mutated_datum_bytes(value, force_color, force_gray):
    if force_color and force_gray:
        force_gray = False
    either_loads_or_caffelite_error(decode_datum, value, force_color, force_gray)


# ---- HDF5 files -------------------------------------------------------------------------------------------
@st.composite
def h5_layouts(draw):
    """A random HDF5 file layout: dataset name -> (shape, dtype), maybe a group instead."""
    names = draw(st.lists(st.sampled_from(["data", "label", "other", "data/inner"]), max_size=3, unique=True))
    layout = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(["f4", "f8", "i4", "u1", "S3", "bool", "c8"]))
        layout[name] = (shape, dtype)
    return layout


def _write_layout(path, layout):
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in layout.items():
            try:
                f.create_dataset(name, data=np.zeros(shape, dtype=dtype))
            except (TypeError, ValueError):  # 'data/inner' after a dataset 'data': keep the first
                pass


def _read_all(list_file):
    source = HDF5Source(str(list_file), ["data", "label"], shuffle=True, seed_key=(1,))
    source.read(np.arange(min(source.total_rows * 2, 7)))


@FUZZ
@given(h5_layouts())
def test_random_hdf5_layouts(tmp_path, layout):
    path = tmp_path / "f.h5"
    _write_layout(path, layout)
    (tmp_path / "list.txt").write_text("f.h5\n")
    either_loads_or_caffelite_error(_read_all, tmp_path / "list.txt")


def _valid_h5(folder) -> bytes:
    path = folder / "valid.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(24, dtype=np.float32).reshape(6, 4)
        f["label"] = np.arange(6, dtype=np.float32)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_hdf5_bytes(tmp_path, data):
    blob = data.draw(mutated_bytes(_valid_h5(tmp_path)))
    (tmp_path / "m.h5").write_bytes(blob)
    (tmp_path / "list.txt").write_text("m.h5\n")
    either_loads_or_caffelite_error(_read_all, tmp_path / "list.txt")


# ---- safety: no unpickling, no unsafe YAML, anywhere ----------------------------------------------------
FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|shelve|joblib)\b", re.M), "imports a pickle module"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allows pickles in numpy"),
    (re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\("), "loads YAML unsafely"),
    (re.compile(r"Loader\s*=\s*(yaml\.)?(Unsafe|Full)?Loader\b"), "uses an unsafe YAML loader"),
    (re.compile(r"\btorch\.load\s*\("), "unpickles through torch.load"),
]


def test_no_pickle_and_only_safe_yaml_in_the_tree():
    problems = []
    files = [*sorted((REPO / "caffelite").rglob("*.py")), *sorted((REPO / "scripts").rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, what in FORBIDDEN:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(REPO)}:{line}: {what}: {match.group(0).strip()}")
        for match in re.finditer(r"\bnp\.load\s*\(([^)]*)\)", text):
            if "allow_pickle=False" not in match.group(1):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path.relative_to(REPO)}:{line}: np.load without allow_pickle=False")
    assert problems == []
