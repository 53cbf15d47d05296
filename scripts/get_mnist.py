#!/usr/bin/env python3
"""Fetch MNIST and write it as Caffe Datum LMDBs (what examples/mnist/create_mnist.sh makes).

    python scripts/get_mnist.py                 # download 60k + 10k, verify MD5, convert
    python scripts/get_mnist.py --from DIR      # use local IDX files (.gz or not)
    python scripts/get_mnist.py --out DIR       # write elsewhere (default: data/mnist/)

Writes ``mnist_train_lmdb`` and ``mnist_test_lmdb`` in the output folder:
raw Datums (channels 1, 28x28, uint8, label) under keys ``%08d`` in file
order, as Caffe's convert_mnist_data does. When only the 10k test files are
available (offline), images 0..7999 become the training set and 8000..9999
the test set. Re-running replaces the databases atomically.
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from caffelite.data.lmdb_source import write_lmdb  # noqa: E402
from caffelite.download import FetchError, fetch, verify  # noqa: E402
from caffelite.errors import DataError  # noqa: E402
from caffelite.proto import pb  # noqa: E402

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The published MD5 sums of the original files (as torchvision and others check them);
# the t10k files also have the sums of the copies in the project's shared data folder.
MD5 = {
    "train-images-idx3-ubyte.gz": {"f68b3c2dcbeaaa9fbdd348bbdeb94873"},
    "train-labels-idx1-ubyte.gz": {"d53e105ee54ea40749a09fcbcd1e9432"},
    "t10k-images-idx3-ubyte.gz": {"9fb629c4189551a2d022fa330f9573f3",
                                  "4bec579dddc777a073fb1950567b8fe4"},
    "t10k-labels-idx1-ubyte.gz": {"ec29112dd5afa0611ce80d1b7f02629c",
                                  "1faefaf4d5c525d57b71ff59bd22c34f"},
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
RETRIES = 2  # per mirror: a flaky link is retried; an offline machine fails within seconds
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
OFFLINE_SPLIT = 8000  # offline convention: test images 0..7999 train, 8000..9999 test


class OfflineError(Exception):
    pass


def download(name: str, folder: Path, timeout: float = 30.0) -> Path:
    """Fetch ``name`` into ``folder`` from the first mirror that has it (kept when its checksum
    already matches); resumable, and verified before it takes its name."""
    try:
        got = fetch([mirror + name for mirror in MIRRORS], folder / name, {"md5": MD5[name]},
                    timeout=timeout, retries=RETRIES)
    except FetchError as exc:  # no mirror could be reached, or none sent the right bytes
        raise OfflineError(f"cannot download {name}:\n  " + "\n  ".join(exc.failures)) from None
    print(f"{got.path}: present, checksum OK" if got.url is None else f"downloaded {got.url}")
    return got.path


def find_local(folder: Path, name: str) -> Path | None:
    """``name`` in ``folder``, gzip-compressed or not."""
    for candidate in (folder / name, folder / name[:-3], folder / name[:-3].replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (images: n x rows x cols, labels: n), validated before its body is read."""
    opener = gzip.open if path.suffix == ".gz" else open
    ndim = 3 if magic == IMAGE_MAGIC else 1
    kind = "image" if magic == IMAGE_MAGIC else "label"
    try:
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim:
                raise DataError(f"'{path}' is too short to be an IDX {kind} file")
            found, *dims = struct.unpack(f">{1 + ndim}I", head)
            if found != magic:
                raise DataError(f"'{path}' is not an IDX {kind} file (magic number {found}, expected {magic})",
                                hint="check that the images and labels files are not swapped or corrupt")
            if dims[0] == 0 or dims[0] > 10_000_000 or (ndim == 3 and (dims[1], dims[2]) != (28, 28)):
                raise DataError(f"'{path}' declares {' x '.join(map(str, dims))} {kind}s; "
                                "MNIST has up to 60000 items of 28 x 28")
            size = int(np.prod(dims))
            body = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read '{path}': {exc}", hint="the file is corrupt; fetch it again") from None
    if len(body) != size:
        raise DataError(f"'{path}' holds {len(body) if len(body) < size else 'more than ' + str(size)} "
                        f"bytes of {kind} data; its header declares {size}",
                        hint="the file is truncated or corrupt; fetch it again")
    return np.frombuffer(body, np.uint8).reshape(dims)


def datum_records(images: np.ndarray, labels: np.ndarray):
    datum = pb.Datum(channels=1, height=28, width=28)
    for i, (image, label) in enumerate(zip(images, labels)):
        datum.data = image.tobytes()
        datum.label = int(label)
        yield b"%08d" % i, datum.SerializeToString()


def gather(args) -> dict[str, Path]:
    """Paths of the IDX files to convert: local (--from) or downloaded."""
    if args.source:
        folder = Path(args.source)
        if not folder.is_dir():
            raise DataError(f"--from folder '{folder}' does not exist")
        found = {key: find_local(folder, name) for key, name in FILES.items()}
        for path in found.values():
            if path is not None and path.suffix == ".gz" and verify(path, {"md5": MD5[path.name]}):
                print(f"warning: {path} does not match the published MD5 sum; "
                      "using it since its IDX header checks out", file=sys.stderr)
        found = {k: v for k, v in found.items() if v is not None}
        if "test_images" not in found or "test_labels" not in found:
            raise DataError(f"'{folder}' lacks t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
                            hint="--from needs at least the two MNIST test files")
        return found
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    return {key: download(name, folder) for key, name in FILES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="use the IDX files in DIR instead of downloading")
    parser.add_argument("--out", default=str(REPO / "data" / "mnist"), metavar="DIR",
                        help="output folder (default: data/mnist under the repository)")
    args = parser.parse_args(argv)
    try:
        paths = gather(args)
        test_images = read_idx(paths["test_images"], IMAGE_MAGIC)
        test_labels = read_idx(paths["test_labels"], LABEL_MAGIC)
        if "train_images" in paths and "train_labels" in paths:
            splits = {"train": (read_idx(paths["train_images"], IMAGE_MAGIC),
                                read_idx(paths["train_labels"], LABEL_MAGIC)),
                      "test": (test_images, test_labels)}
        else:
            print(f"only the 10k test set is available: images 0..{OFFLINE_SPLIT - 1} -> train, "
                  f"{OFFLINE_SPLIT}..{len(test_images) - 1} -> test")
            splits = {"train": (test_images[:OFFLINE_SPLIT], test_labels[:OFFLINE_SPLIT]),
                      "test": (test_images[OFFLINE_SPLIT:], test_labels[OFFLINE_SPLIT:])}
        for split, (images, labels) in splits.items():
            if len(images) != len(labels):
                raise DataError(f"the {split} set has {len(images)} images but {len(labels)} labels")
            if labels.max(initial=0) > 9:
                raise DataError(f"the {split} labels go up to {labels.max()}; MNIST labels are 0..9")
        out = Path(args.out)
        for split, (images, labels) in splits.items():
            db = out / f"mnist_{split}_lmdb"
            count = write_lmdb(str(db), datum_records(images, labels))
            print(f"wrote {count} records (1x28x28 uint8 + label) to {db}")
    except OfflineError as exc:
        print(f"get_mnist.py: error: {exc}\nNo network? Put the MNIST .gz files in a folder and run "
              f"python scripts/get_mnist.py --from DIR (the two t10k files are enough).", file=sys.stderr)
        return 1
    except DataError as exc:
        print(f"get_mnist.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
