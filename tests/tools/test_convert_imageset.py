"""caffelite convert_imageset against the DBs real Caffe made from images/list.txt, and on bad input."""
import os
import shutil

import lmdb
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from caffelite.cli import main
from caffelite.data.datum import datum_to_array, decode_image
from caffelite.data.imageset import opencv, read_list, resize_linear
from caffelite.errors import DataError
from caffelite.proto import pb

IMAGES = FIXTURES / "images"
ROOT = str(IMAGES) + "/"
LIST = str(IMAGES / "list.txt")
FIXTURE_FLAGS = {
    "lmdb_raw_32": ["--resize_height", "32", "--resize_width", "32"],
    "lmdb_encoded": ["--encoded"],
    "lmdb_png_24x28": ["--encoded", "--encode_type", "png", "--resize_height", "24", "--resize_width", "28"],
    "lmdb_gray_16": ["--gray", "--resize_height", "16", "--resize_width", "16"],
}
DECODERS = ["pillow", pytest.param("opencv", marks=pytest.mark.skipif(opencv() is None, reason="no OpenCV"))]


def records(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def datum(value):
    d = pb.Datum()
    d.ParseFromString(value)
    return d


def convert(*argv):
    return main(["convert_imageset", *map(str, argv)])


def leftovers(folder):
    """Temporary databases a failed run might have left."""
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# ---- Caffe's fixture databases --------------------------------------------------
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", sorted(FIXTURE_FLAGS))
def test_reproduces_caffe_databases(tmp_path, name, decoder):
    out = tmp_path / name
    workers = "2" if name == "lmdb_raw_32" else "1"
    assert convert(*FIXTURE_FLAGS[name], "--decoder", decoder, "--workers", workers, ROOT, LIST, out) == 0
    theirs, ours = records(IMAGES / name), records(out)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        a, b = datum(value), datum(ours[key])
        for field in ("channels", "height", "width", "label", "encoded"):
            assert getattr(a, field) == getattr(b, field), (key, field)
            assert a.HasField(field) == b.HasField(field), (key, field)
        if name == "lmdb_encoded":
            assert b.data == a.data  # no resize: the original file bytes
            continue
        if decoder == "opencv":
            assert ours[key] == value  # Caffe uses OpenCV: the very same record
        pixels_a, pixels_b = datum_to_array(a).astype(int), datum_to_array(b).astype(int)
        assert pixels_a.shape == pixels_b.shape
        assert np.abs(pixels_a - pixels_b).max() <= 1, key


def test_raw_without_resize_is_the_decoded_file(tmp_path):
    """No resize: each raw record holds exactly the pixels of the original image (BGR, C x H x W)."""
    assert convert("--workers", "1", ROOT, LIST, tmp_path / "db") == 0
    originals = records(IMAGES / "lmdb_encoded")
    ours = records(tmp_path / "db")
    assert list(ours) == list(originals)
    for key, value in ours.items():
        d = datum(value)
        assert not d.encoded and d.label == datum(originals[key]).label
        expected = decode_image(datum(originals[key]).data, force_color=True)
        np.testing.assert_array_equal(datum_to_array(d), expected)


@pytest.mark.skipif(opencv() is None, reason="no OpenCV")
def test_resize_linear_is_opencv_bit_for_bit():
    cv2 = opencv()
    rng = np.random.default_rng(0)
    sizes = [(256, 256, 227, 227), (375, 500, 256, 256), (40, 40, 20, 20), (5, 3, 17, 31), (1, 9, 4, 4), (33, 64, 16, 60)]
    for i in range(40):
        sizes.append(tuple(int(v) for v in rng.integers(1, 70, 4)))
    for k, (h, w, nh, nw) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3) if k % 2 else (h, w), dtype=np.uint8)
        np.testing.assert_array_equal(resize_linear(image, nh, nw), cv2.resize(image, (nw, nh)), err_msg=str((h, w, nh, nw)))


def test_encode_type_reencodes_other_formats(tmp_path):
    assert convert("--encode_type", "jpg", "--workers", "1", ROOT, LIST, tmp_path / "db") == 0
    originals = records(IMAGES / "lmdb_encoded")
    for key, value in records(tmp_path / "db").items():
        d = datum(value)
        assert d.encoded
        if key.endswith(b".jpg"):
            assert d.data == datum(originals[key]).data and not d.HasField("channels")
        else:  # a PNG stored as JPEG: re-encoded, with its shape
            assert d.data[:2] == b"\xff\xd8"
            image = decode_image(d.data)
            assert (d.channels, d.height, d.width) == image.shape
            original = decode_image(datum(originals[key]).data)
            assert np.abs(image.astype(int) - original).mean() < 8  # lossy JPEG, chroma subsampled


def test_workers_and_shuffle(tmp_path):
    assert convert("--shuffle", "--workers", "2", ROOT, LIST, tmp_path / "a") == 0
    assert convert("--shuffle", "-workers", "1", ROOT, LIST, tmp_path / "b") == 0
    assert convert("--shuffle", "-seed", "3", ROOT, LIST, tmp_path / "c") == 0
    a, b, c = records(tmp_path / "a"), records(tmp_path / "b"), records(tmp_path / "c")
    assert a == b  # same seed, any number of workers: the same database
    assert list(a) != list(c)
    names = [key.split(b"_", 1)[1].decode() for key in a]
    assert [key[:8] for key in a] == [b"%08d" % i for i in range(24)]
    assert sorted(names) == sorted(p for p, _ in read_list(LIST)) and names != [p for p, _ in read_list(LIST)]
    labels = dict(read_list(LIST))
    assert all(datum(v).label == labels[k.split(b"_", 1)[1].decode()] for k, v in a.items())


def test_single_dash_flags_and_logs(tmp_path, capsys):
    assert convert("-gray", "-resize_width", "8", "-resize_height", "8", "-backend", "lmdb", ROOT, LIST, tmp_path / "db") == 0
    err = capsys.readouterr().err
    assert "A total of 24 images." in err and "Processed 24 files." in err
    d = datum(next(iter(records(tmp_path / "db").values())))
    assert (d.channels, d.height, d.width) == (1, 8, 8)


# ---- folder mode --------------------------------------------------------------------
def test_folder_tree(tmp_path):
    root = tmp_path / "tree"
    for cls, n in (("dogs", 2), ("cats", 3)):
        for i in range(n):
            sub = root / cls / ("nested" if i == 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10 + i, 12), (i * 40, 100, 200)).save(sub / f"{cls}{i}.png")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file, not a class")
    db = tmp_path / "out" / "train_lmdb"
    assert convert("--folders", "--resize_height", "6", "--resize_width", "6", root, db) == 0
    keys = list(records(db))
    assert keys == [b"00000000_cats/cats0.png", b"00000001_cats/cats1.png", b"00000002_cats/nested/cats2.png",
                    b"00000003_dogs/dogs0.png", b"00000004_dogs/dogs1.png"]
    assert [datum(v).label for v in records(db).values()] == [0, 0, 0, 1, 1]
    assert (tmp_path / "out" / "train_lmdb.labels.txt").read_text() == "cats\ndogs\n"
    assert convert("--folders", root, LIST, tmp_path / "x") == 2


# ---- bad input --------------------------------------------------------------------
@pytest.fixture
def images(tmp_path):
    """Three good images, a corrupt JPEG and a list-file writer."""
    root = tmp_path / "img"
    root.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        shutil.copy(IMAGES / "square" / ("img_00.png" if name.endswith("png") else "img_02.jpg"), root / name)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))

    def write(lines):
        path = tmp_path / "list.txt"
        path.write_text("".join(line + "\n" for line in lines))
        return path
    return root, write


def test_missing_and_corrupt_images_are_skipped_and_reported(tmp_path, images, capsys):
    root, write = images
    listfile = write(["a.jpg 0", "missing.jpg 1", "b.png 1", "bad.jpg 0", "c.jpg 1"])
    assert convert(root, listfile, tmp_path / "db") == 3
    err = capsys.readouterr().err
    assert "Could not open or find file missing.jpg" in err
    assert "bad.jpg: cannot decode the image" in err
    assert "2 of 5 images could not be read and were skipped: missing.jpg, bad.jpg" in err
    assert "holds the other 3" in err
    # The good images are kept under their line numbers, as Caffe does.
    assert list(records(tmp_path / "db")) == [b"00000000_a.jpg", b"00000002_b.png", b"00000004_c.jpg"]


def test_no_readable_image_leaves_no_database(tmp_path, images, capsys):
    root, write = images
    assert convert(root, write(["missing.jpg 1", "bad.jpg 0"]), tmp_path / "db") == 3
    assert "none of the 2 images could be read" in capsys.readouterr().err
    assert not (tmp_path / "db").exists() and not leftovers(tmp_path)


def test_empty_list(tmp_path, images, capsys):
    root, write = images
    assert convert(root, write(["", "  "]), tmp_path / "db") == 3
    err = capsys.readouterr().err
    assert "list.txt: the list file holds no images" in err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("line, message", [("b.png one", "list.txt:2: label 'one' of 'b.png' is not an integer"),
                                           ("b.png 1.5", "list.txt:2: label '1.5'"),
                                           ("b.png", "list.txt:2: line 'b.png' has no label")])
def test_bad_label(tmp_path, images, capsys, line, message):
    root, write = images
    assert convert(root, write(["a.jpg 0", line]), tmp_path / "db") == 3
    assert message in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_paths_with_spaces_split_at_the_last_space(tmp_path, images):
    root, write = images
    shutil.copy(root / "a.jpg", root / "my photo.jpg")
    assert convert(root, write(["my photo.jpg  7"]), tmp_path / "db") == 0
    [(key, value)] = records(tmp_path / "db").items()
    assert key == b"00000000_my photo.jpg" and datum(value).label == 7


def test_existing_database_needs_force(tmp_path, images, capsys):
    root, write = images
    listfile = write(["a.jpg 0", "b.png 1"])
    assert convert(root, listfile, tmp_path / "db") == 0
    before = records(tmp_path / "db")
    assert convert("--resize_height", "5", "--resize_width", "5", root, listfile, tmp_path / "db") == 2
    assert "already exists (pass --force to replace it" in capsys.readouterr().err
    assert records(tmp_path / "db") == before
    assert convert("--force", "--resize_height", "5", "--resize_width", "5", root, listfile, tmp_path / "db") == 0
    assert datum(records(tmp_path / "db")[b"00000000_a.jpg"]).height == 5


def test_check_size(tmp_path, capsys):
    assert convert("--check_size", "--workers", "1", ROOT, LIST, tmp_path / "db") == 3
    err = capsys.readouterr().err
    assert "image 'circle/img_01.jpg' is 3x46x45 but 'square/img_00.png' is 3x45x24 (--check_size)" in err
    assert not (tmp_path / "db").exists() and not leftovers(tmp_path)
    assert convert("--check_size", "--resize_height", "9", "--resize_width", "9", ROOT, LIST, tmp_path / "db") == 0


@pytest.mark.parametrize("argv, message", [
    (["--backend", "leveldb"], "LevelDB is not supported"),
    (["--encode_type", "gif"], "unknown --encode_type 'gif'"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_flags(tmp_path, capsys, argv, message):
    assert convert(*argv, ROOT, LIST, tmp_path / "db") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_wrong_number_of_paths(tmp_path, capsys):
    assert convert(ROOT, tmp_path / "db") == 2
    assert "takes ROOT/ LISTFILE DB" in capsys.readouterr().err


def test_missing_root(tmp_path, capsys):
    assert convert(tmp_path / "nowhere", LIST, tmp_path / "db") == 3
    assert "ROOT folder" in capsys.readouterr().err and not (tmp_path / "db").exists()


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="list file not found"):
        read_list(str(tmp_path / "nope.txt"))
