#!/usr/bin/env python3
"""Fetch CIFAR-10 and write it as Caffe Datum LMDBs plus its mean image (Caffe's examples/cifar10).

    python scripts/get_cifar10.py               # download the binary version, verify MD5, convert
    python scripts/get_cifar10.py --from DIR    # use data_batch_{1..5}.bin + test_batch.bin in DIR,
                                                # or cifar-10-binary.tar.gz (DIR or the file itself)
    python scripts/get_cifar10.py --out DIR     # write elsewhere (default: data/cifar10/)

Writes, as create_cifar10.sh does with convert_cifar_data and compute_image_mean:
``cifar10_train_lmdb`` (50000 records) and ``cifar10_test_lmdb`` (10000): raw
Datums 3 x 32 x 32 whose bytes are the file's own (R plane, G plane, B plane:
Caffe stores them without reordering), label 0..9, keys ``%05d`` (train: batch
file number * 10000 + index); and ``mean.binaryproto`` (1 x 3 x 32 x 32, the
per-pixel mean of the training set, float sums divided as Caffe does).
The binary files are read as fixed 3073-byte records (label byte + 3072
pixels), nothing is unpickled, and the archive is extracted only when every
member stays inside the target folder. Every output is replaced atomically.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from caffelite.data.lmdb_source import write_lmdb  # noqa: E402
from caffelite.download import ChecksumError, DownloadError, fetch, verify  # noqa: E402
from caffelite.errors import DataError  # noqa: E402
from caffelite.io.binaryproto import write_binaryproto  # noqa: E402
from caffelite.proto import pb  # noqa: E402

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
# The MD5 published on https://www.cs.toronto.edu/~kriz/cifar.html for the binary version.
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G and B planes of 32 x 32
BATCH = 10000  # records per file in the real data; Caffe's key stride per train file
RETRIES = 2  # a flaky link is retried; an offline machine fails within seconds


class OfflineError(Exception):
    pass


def download(folder: Path, timeout: float = 60.0) -> Path:
    """The archive in ``folder``, fetched (resumable, MD5-verified) unless a copy with the right MD5
    is there."""
    try:
        got = fetch(URL, folder / ARCHIVE, {"md5": MD5}, timeout=timeout, retries=RETRIES)
    except DownloadError as exc:
        raise OfflineError(f"cannot download {'; '.join(exc.failures)}") from None
    except ChecksumError as exc:
        raise DataError(exc.message, hint="the download is corrupt; run the script again") from None
    print(f"{got.path}: present, MD5 OK" if got.url is None else f"downloaded {got.url} (MD5 OK)")
    return got.path


def safe_extract(archive: Path, target: Path) -> None:
    """Extract the regular files and folders of ``archive`` into ``target``; refuse any
    member that is a link or device, or whose path would leave ``target``."""
    root = target.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                path = (root / member.name).resolve()
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"'{archive}' holds '{member.name}', which is not a regular file",
                                    hint="refusing to extract links or devices; fetch the archive again")
                if os.path.isabs(member.name) or (path != root and root not in path.parents):
                    raise DataError(f"'{archive}' holds '{member.name}', which would be written "
                                    f"outside '{target}'", hint="refusing to extract it; fetch the archive again")
            for member in members:
                if member.isdir():
                    (root / member.name).mkdir(parents=True, exist_ok=True)
                    continue
                (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(root / member.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract '{archive}': {exc}", hint="the archive is corrupt; fetch it again") from None


def find_batches(folder: Path) -> Path:
    """The folder holding the .bin files: ``folder`` or its cifar-10-batches-bin/."""
    for candidate in (folder, folder / "cifar-10-batches-bin"):
        if (candidate / TEST_FILE).is_file():
            break
    else:
        candidate = folder
    missing = [name for name in TRAIN_FILES + [TEST_FILE] if not (candidate / name).is_file()]
    if missing:
        raise DataError(f"'{folder}' lacks {', '.join(missing)}",
                        hint="--from needs the five data_batch_N.bin files and test_batch.bin "
                             "of the CIFAR-10 binary version, or cifar-10-binary.tar.gz")
    return candidate


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels n, pixels n x 3072) of one binary batch file, validated."""
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(f"'{path}' holds {raw.size} bytes, not a whole number of {RECORD}-byte "
                        "CIFAR-10 records", hint="the file is truncated or not from the binary version")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DataError(f"'{path}' has label {labels.max()}; CIFAR-10 labels are 0..9",
                        hint="the file is corrupt or from CIFAR-100")
    return labels, records[:, 1:]


def datum_records(batches: list[tuple[np.ndarray, np.ndarray]]):
    datum = pb.Datum(channels=3, height=32, width=32)
    for file_id, (labels, pixels) in enumerate(batches):
        for i, (label, image) in enumerate(zip(labels, pixels)):
            datum.label = int(label)
            datum.data = image.tobytes()
            yield b"%05d" % (file_id * BATCH + i), datum.SerializeToString()


def image_mean(batches) -> np.ndarray:
    """compute_image_mean: per-pixel sums (exact; Caffe's float sums are exact below 2^24),
    then sum / count in float."""
    total = sum(pixels.sum(axis=0, dtype=np.int64) for _, pixels in batches)
    count = sum(len(labels) for labels, _ in batches)
    return (total.astype(np.float32) / np.float32(count)).reshape(1, 3, 32, 32)


def gather(args, work: Path) -> Path:
    """The folder with the .bin files: local (--from) or from the downloaded archive."""
    if args.source:
        source = Path(args.source)
        if source.is_dir() and (source / ARCHIVE).is_file() and not (
                (source / TEST_FILE).is_file() or (source / "cifar-10-batches-bin").is_dir()):
            source = source / ARCHIVE
        if source.is_file():
            bad = verify(source, {"md5": MD5})
            if not bad:
                print(f"{source}: MD5 OK")
            else:
                print(f"warning: {source} does not have the published MD5 ({'; '.join(bad)}); "
                      "using it if its files have the CIFAR-10 record structure", file=sys.stderr)
            safe_extract(source, work)
            return find_batches(work)
        if not source.is_dir():
            raise DataError(f"--from '{source}' does not exist")
        return find_batches(source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    safe_extract(download(out), work)
    return find_batches(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="use local .bin files (or cifar-10-binary.tar.gz) instead of downloading")
    parser.add_argument("--out", default=str(REPO / "data" / "cifar10"), metavar="DIR",
                        help="output folder (default: data/cifar10 under the repository)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cifar10-") as work:
            folder = gather(args, Path(work))
            train = [read_batch(folder / name) for name in TRAIN_FILES]
            test = [read_batch(folder / TEST_FILE)]
        out = Path(args.out)
        for split, batches in (("train", train), ("test", test)):
            db = out / f"cifar10_{split}_lmdb"
            count = write_lmdb(str(db), datum_records(batches))
            print(f"wrote {count} records (3x32x32 uint8 + label) to {db}")
        mean = image_mean(train)
        write_binaryproto(str(out / "mean.binaryproto"), mean)
        print(f"wrote {out / 'mean.binaryproto'}; per-channel means (file order R, G, B): "
              + ", ".join(f"{v:g}" for v in mean[0].mean(axis=(1, 2))))
    except OfflineError as exc:
        print(f"get_cifar10.py: error: {exc}\nNo network? Download {ARCHIVE} elsewhere and run "
              f"python scripts/get_cifar10.py --from DIR (DIR holding the archive or its .bin files).",
              file=sys.stderr)
        return 1
    except DataError as exc:
        print(f"get_cifar10.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
