"""``caffelite convert_imageset``: images listed in a file (or sorted in class folders) -> an LMDB of Datums.

    caffelite convert_imageset [flags] ROOT/ LISTFILE DB
    caffelite convert_imageset [flags] --folders ROOT/ DB

Caffe's tool and flags: LISTFILE lines are ``relative/path label``; keys are
``%08d_<path>`` (the line's position after ``--shuffle``); images are stored as
raw BGR C x H x W Datums, or with ``--encoded`` as PNG/JPEG bytes (the original
file when nothing changes). ``--folders`` takes one sub-folder per class
instead (labels 0..K-1 in sorted name order) and writes the class names, one
per line, to ``DB.labels.txt`` beside the database.

Unlike Caffe: images are decoded by ``--workers`` threads (processes with
Pillow); an existing DB is replaced only with ``--force``; the DB appears only
once complete; images that cannot be read are skipped, listed at the end, and
make the exit status 3.
"""
from __future__ import annotations

import os
import sys

from ..cli import _flag
from ..errors import ConfigError, DataError

COMMAND = "convert_imageset"
HELP = "convert a list of images (or class folders) into an LMDB of Datums"
LEVELDB_HINT = ("LevelDB is not supported; use --backend lmdb (the default): caffelite's Data layer "
                "reads LMDB. Re-run this conversion with --backend lmdb")
MAX_KEY = 511  # LMDB's largest key in bytes


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="ROOT/ LISTFILE DB, or with --folders: ROOT/ DB")
    _flag(parser, "folders", action="store_true",
          help="ROOT holds one sub-folder per class instead of a list file; class names go to DB.labels.txt")
    _flag(parser, "gray", action="store_true", help="store grey images (one channel)")
    _flag(parser, "shuffle", action="store_true", help="shuffle the images before storing them")
    _flag(parser, "seed", type=int, default=0, help="random seed of --shuffle (default 0: the same order every run)")
    _flag(parser, "backend", default="lmdb", help="database backend: lmdb (LevelDB is not supported)")
    _flag(parser, "resize_width", type=int, default=0, help="width images are resized to (0: keep)")
    _flag(parser, "resize_height", type=int, default=0, help="height images are resized to (0: keep)")
    _flag(parser, "check_size", action="store_true", help="check that all images have the same size")
    _flag(parser, "encoded", action="store_true", help="store the images as encoded files (PNG/JPEG)")
    _flag(parser, "encode_type", default="", help="png or jpg: the format of encoded images (implies --encoded)")
    _flag(parser, "workers", type=int, default=os.cpu_count() or 1, help="decoding threads (processes with Pillow; default: all cores)")
    _flag(parser, "decoder", choices=("auto", "opencv", "pillow"), default="auto",
          help="image library: OpenCV when installed (what Caffe uses), else Pillow")
    _flag(parser, "force", action="store_true", help="replace DB if it exists")


def run(args) -> int:
    from ..data.imageset import ImageSettings, convert_images, read_list, scan_folders  # noqa: PLC0415
    from ..log import get_logger  # noqa: PLC0415

    log = get_logger()
    root, listfile, db = _paths(args)
    _check_flags(args, db)
    if args.folders:
        entries, classes = scan_folders(root)
        if not entries:
            raise DataError(f"the class folders of '{root}' hold no images",
                            hint="images need an extension such as .jpg or .png")
    else:
        if root and not os.path.isdir(root):
            raise DataError(f"ROOT folder '{root}' does not exist",
                            hint="image paths in the list file are taken relative to ROOT/")
        entries, classes = read_list(listfile), None
        if not entries:
            raise DataError("the list file holds no images", file=listfile,
                            hint="each line is 'relative/path label'")
    if args.shuffle:
        import numpy as np  # noqa: PLC0415

        log.info("Shuffling data")
        order = np.random.default_rng(args.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    log.info("A total of %d images.", len(entries))
    encode_type = args.encode_type.lower()
    if encode_type and not args.encoded:
        log.info("encode_type specified, assuming encoded=true.")
    settings = ImageSettings(root=root, is_color=not args.gray, resize_height=max(0, args.resize_height),
                             resize_width=max(0, args.resize_width), encoded=bool(args.encoded or encode_type),
                             encode_type=encode_type, decoder=args.decoder)
    if (settings.resize_height > 0) != (settings.resize_width > 0):
        log.warning("only one of --resize_height / --resize_width is set: images keep their size "
                    "(as in Caffe, both are needed to resize)")
    records = convert_images(entries, settings, max(1, args.workers))
    try:
        count, failed = _write(records, entries, db, args.check_size, log)
    finally:
        records.close()  # stops the worker processes at once, also on an error
    if classes is not None:
        from ..io.atomic import write_text  # noqa: PLC0415

        write_text(labels_path(db), "".join(f"{name}\n" for name in classes))
        log.info("Wrote %d class names to %s", len(classes), labels_path(db))
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise DataError(f"{len(failed)} of {len(entries)} images could not be read and were skipped: {shown}",
                        hint=f"'{db}' holds the other {count}; fix or drop those images and "
                             "convert again with --force")
    return 0


def labels_path(db: str) -> str:
    """Where --folders writes the class names: ``<DB>.labels.txt`` beside the database folder."""
    return os.path.normpath(db) + ".labels.txt"


def _paths(args) -> tuple[str, str | None, str]:
    if args.folders:
        if len(args.paths) != 2:
            raise ConfigError(f"--folders takes ROOT/ DB, got {len(args.paths)} paths",
                              hint="caffelite convert_imageset --folders images/ train_lmdb")
        return args.paths[0], None, args.paths[1]
    if len(args.paths) != 3:
        raise ConfigError(f"convert_imageset takes ROOT/ LISTFILE DB, got {len(args.paths)} paths",
                          hint="or --folders ROOT/ DB for one sub-folder per class")
    return tuple(args.paths)


def _check_flags(args, db: str) -> None:
    backend = args.backend.lower()
    if backend == "leveldb":
        raise ConfigError("--backend leveldb: LevelDB is not supported", hint=LEVELDB_HINT)
    if backend != "lmdb":
        raise ConfigError(f"unknown --backend '{args.backend}'", hint="use lmdb")
    if args.encode_type and args.encode_type.lower() not in ("png", "jpg", "jpeg"):
        raise ConfigError(f"unknown --encode_type '{args.encode_type}'", hint="use png or jpg")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if os.path.exists(db) and not args.force:
        raise ConfigError(f"'{db}' already exists", hint="pass --force to replace it, or choose another path")


def _write(records, entries, db: str, check_size: bool, log) -> tuple[int, list[str]]:
    """Put every good record into a new LMDB at ``db``; returns (stored, names that failed)."""
    from ..data.lmdb_source import LMDBWriter  # noqa: PLC0415

    progress = _progress(len(entries))
    failed: list[str] = []
    first = None  # (shape, name) of the first image, for --check_size
    with LMDBWriter(db, append=len(entries) <= 10 ** 8) as writer:  # %08d keys: increasing
        log.info("Opened lmdb %s", db)
        for line_id, ((name, _label), record) in enumerate(zip(entries, records)):
            progress.update(1)
            if record.error is not None:
                log.error("%s", record.error)
                failed.append(name)
                continue
            if check_size:
                if first is None:
                    first = (record.shape, name)
                elif record.shape != first[0]:
                    raise DataError(f"image '{name}' is {_size(record.shape)} but '{first[1]}' is "
                                    f"{_size(first[0])} (--check_size)",
                                    hint="give --resize_height and --resize_width to make them equal")
            key = f"{line_id:08d}_{name}".encode()
            if len(key) > MAX_KEY:
                raise DataError(f"the path of image '{name}' is too long for an LMDB key ({len(key)} bytes, "
                                f"at most {MAX_KEY})", hint="use shorter paths")
            writer.put(key, record.value)
            stored = len(writer)
            if stored % 1000 == 0 and not progress.bar:
                log.info("Processed %d files.", stored)
        stored = len(writer)
        progress.close()
        if stored == 0:
            raise DataError(f"none of the {len(entries)} images could be read", hint="check ROOT/ and the paths")
        if stored % 1000 != 0 or progress.bar:
            log.info("Processed %d files.", stored)
    return stored, failed


def _size(shape) -> str:
    return "x".join(str(n) for n in shape)


class _progress:
    """A tqdm bar on a terminal; nothing otherwise (the log says 'Processed N files.')."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm  # noqa: PLC0415
            except ImportError:
                return
            tqdm.monitor_interval = 0  # no monitor thread: the worker pool forks only a single-threaded process
            self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
