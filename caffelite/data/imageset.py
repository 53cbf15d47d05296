"""Image lists and folder trees turned into Datum records: the engine of ``convert_imageset``.

A list file has one ``relative/path label`` per line (split at the last run of
white space, so paths may hold spaces); a folder tree has one sub-folder per
class (labels 0..K-1 in sorted name order). Each image becomes a Datum as
Caffe's ``ReadImageToDatum`` makes it:

- raw: ``channels``/``height``/``width``, C x H x W uint8 BGR (or grey) pixels,
  ``label``, ``encoded: false``;
- encoded, no resize, colour, and the file's own format asked for: the
  original file bytes, ``label`` and ``encoded: true`` (no shape fields);
- encoded otherwise: the decoded (resized) image re-encoded as PNG/JPEG
  (``encode_type``, else the file's extension), with its shape fields.

Images are decoded with OpenCV when ``cv2`` is installed (what Caffe uses), else
with Pillow; resizing is OpenCV's ``INTER_LINEAR`` either way (``resize_linear``
reproduces it bit for bit), so records do not depend on the decoder beyond
JPEG rounding. ``ordered_map`` spreads the work over a pool and gives the
results back in list order: threads when OpenCV decodes (it releases the GIL
while it decodes and resizes, so threads run in parallel and the records reach
the LMDB writer without being pickled through a pipe), processes with Pillow
(caffelite's NumPy resize holds the GIL for part of each image).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import re
import signal
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ..errors import ConfigError, DataError
from ..proto import pb
from .datum import decode_image
from .resize import resize_linear

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".tif", ".tiff", ".webp", ".jp2", ".gif"}
LIST_HINT = "each line is 'relative/path label' with an integer label"
_LINE = re.compile(r"^(.*?\S)\s+(\S+)$")


@functools.lru_cache(maxsize=None)
def opencv():
    """The ``cv2`` module, or None when OpenCV is not installed (looked up once)."""
    try:
        import cv2  # noqa: PLC0415
    except ImportError:
        return None
    return cv2


# ---- what to convert ---------------------------------------------------------------
def read_list(path: str) -> list[tuple[str, int]]:
    """(image path, label) of every non-blank line of a list file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError("list file not found", file=path, hint=LIST_HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the list file ({exc})", file=path) from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if match is None:
            raise DataError(f"line '{line.strip()}' has no label", file=path, line=number, hint=LIST_HINT)
        name, label = match.groups()
        try:
            entries.append((name, int(label)))
        except ValueError:
            raise DataError(f"label '{label}' of '{name}' is not an integer", file=path, line=number,
                            hint=LIST_HINT) from None
    return entries


def scan_folders(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(image path relative to ``root``, label) for a tree ``root/<class>/.../<image>``, and the class names.

    Classes are the sub-folders of ``root`` in sorted order (label = position);
    images are the files with an image extension anywhere below them, sorted.
    """
    if not os.path.isdir(root):
        raise DataError(f"'{root}' is not a folder", hint="--folders takes ROOT/ holding one sub-folder per class")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"'{root}' holds no class sub-folders", hint="--folders takes ROOT/ holding one sub-folder per class")
    entries = []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in files:
                if not file.startswith(".") and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
        entries.extend((path, label) for path in sorted(found))
    return entries, classes


# ---- one image -> one record ------------------------------------------------------
@dataclass(frozen=True)
class ImageSettings:
    """How convert_imageset turns a file into a Datum (picklable, sent to the workers)."""

    root: str = ""
    is_color: bool = True
    resize_height: int = 0
    resize_width: int = 0
    encoded: bool = False
    encode_type: str = ""       # '' = the file's own extension
    decoder: str = "auto"       # auto | opencv | pillow

    @property
    def resize(self) -> bool:
        # Caffe resizes only when both sizes are given.
        return self.resize_height > 0 and self.resize_width > 0

    def use_opencv(self) -> bool:
        if self.decoder == "pillow":
            return False
        if opencv() is None:
            if self.decoder == "opencv":
                raise ConfigError("--decoder opencv: OpenCV is not installed",
                                  hint="pip install opencv-python-headless, or use --decoder pillow")
            return False
        return True


class Record(NamedTuple):
    """A converted image: the serialized Datum and its C x H x W, or why it failed."""

    value: bytes | None
    shape: tuple | None
    error: str | None


def _extension(path: str) -> str:
    base = os.path.basename(path)
    return base.rsplit(".", 1)[1].lower() if "." in base else ""


def _same_format(path: str, encode_type: str) -> bool:
    """Caffe's matchExt: the file's extension is the asked format (jpeg counts as jpg)."""
    ext = _extension(path)
    return ext == encode_type or (encode_type == "jpg" and ext == "jpeg")


def _decode(data: bytes, settings: ImageSettings, cv2) -> np.ndarray:
    """File bytes -> H x W x 3 BGR or H x W grey uint8 (as cv::imread), resized if asked."""
    if cv2 is not None:
        flag = cv2.IMREAD_COLOR if settings.is_color else cv2.IMREAD_GRAYSCALE
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if image is None:
            raise DataError("cannot decode the image")
        if settings.resize:
            image = cv2.resize(image, (settings.resize_width, settings.resize_height),
                               interpolation=cv2.INTER_LINEAR)
        return image
    try:
        chw = decode_image(data, force_color=settings.is_color, force_gray=not settings.is_color)
    except DataError as exc:  # its message speaks of database records; keep only the reason
        reason = exc.message.rsplit("(", 1)[1].rstrip(")") if "(" in exc.message else ""
        raise DataError("cannot decode the image" + (f" ({reason})" if reason else "")) from None
    image = chw.transpose(1, 2, 0) if settings.is_color else chw[0]
    if settings.resize:
        image = resize_linear(image, settings.resize_height, settings.resize_width)
    return image


def _encode(image: np.ndarray, fmt: str, cv2) -> bytes:
    """H x W (x 3 BGR) uint8 -> file bytes as cv::imencode('.fmt') makes them."""
    if cv2 is not None:
        ok, buffer = cv2.imencode("." + fmt, image)
        if not ok:
            raise DataError(f"OpenCV cannot encode '.{fmt}' images")
        return buffer.tobytes()
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    formats = Image.registered_extensions()
    if "." + fmt not in formats:
        raise DataError(f"Pillow cannot encode '.{fmt}' images")
    picture = Image.fromarray(image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1]))
    out = io.BytesIO()
    options = {"quality": 95} if formats["." + fmt] == "JPEG" else {}  # OpenCV's default JPEG quality
    picture.save(out, formats["." + fmt], **options)
    return out.getvalue()


def make_record(entry: tuple[str, int], settings: ImageSettings) -> Record:
    """Read, decode, resize and (re-)encode one image; failures come back as ``Record.error``."""
    path, label = entry
    cv2 = opencv() if settings.use_opencv() else None
    try:
        with open(os.path.join(settings.root, path), "rb") as f:
            data = f.read()
    except OSError as exc:
        return Record(None, None, f"Could not open or find file {path} ({exc.strerror})")
    try:
        image = _decode(data, settings, cv2)
        shape = (1 if image.ndim == 2 else image.shape[2],) + image.shape[:2]
        if settings.encoded:
            fmt = settings.encode_type or _extension(path)
            if not settings.resize and settings.is_color and (not fmt or _same_format(path, fmt)):
                datum = pb.Datum(data=data, label=label, encoded=True)
            else:
                datum = pb.Datum(channels=shape[0], height=shape[1], width=shape[2],
                                 data=_encode(image, fmt or "png", cv2), label=label, encoded=True)
        else:
            pixels = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
            datum = pb.Datum(channels=shape[0], height=shape[1], width=shape[2],
                             data=np.ascontiguousarray(pixels).tobytes(), label=label, encoded=False)
    except DataError as exc:
        return Record(None, None, f"{path}: {exc.message}")
    except Exception as exc:  # a decoder's own error: report the image, keep going
        return Record(None, None, f"{path}: cannot decode the image ({type(exc).__name__}: {exc})")
    return Record(datum.SerializeToString(), shape, None)


# ---- in parallel, in order ---------------------------------------------------------
def _init_worker() -> None:
    # The parent handles Ctrl-C; one OpenCV thread per worker process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2 = opencv()
    if cv2 is not None:
        cv2.setNumThreads(1)


def _run_chunk(func: Callable, chunk: list) -> list:
    return [func(item) for item in chunk]


def _pool_context():
    # fork starts workers at once; it is only safe while this process runs one thread.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def ordered_map(func: Callable, items: Iterable, workers: int = 1, chunk_size: int = 16,
                threads: bool = False) -> Iterator:
    """``map(func, items)`` on ``workers`` processes (or threads), results in input order.

    Items go out in chunks, at most ``4 * workers`` chunks in flight, so memory
    stays bounded however long the input is. For processes ``func`` must be
    picklable (a module-level function or a ``functools.partial`` of one).
    """
    if workers <= 1:
        yield from map(func, items)
        return
    items = iter(items)

    def next_chunk():
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                break
        return chunk

    pool = (ThreadPoolExecutor(workers) if threads else
            ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker))
    pending: deque = deque()
    try:
        for _ in range(4 * workers):
            chunk = next_chunk()
            if not chunk:
                break
            pending.append(pool.submit(_run_chunk, func, chunk))
        while pending:
            results = pending.popleft().result()
            chunk = next_chunk()
            if chunk:
                pending.append(pool.submit(_run_chunk, func, chunk))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert_images(entries: list[tuple[str, int]], settings: ImageSettings, workers: int = 1) -> Iterator[Record]:
    """``make_record`` of every entry, in order, on ``workers`` processes."""
    cv2 = opencv() if settings.use_opencv() else None  # a missing OpenCV is reported now
    if cv2 is not None:
        cv2.setNumThreads(1)  # one image per thread; OpenCV's own threads would compete
    # Small chunks keep the writer busy from the start; 8 images amortise a task's overhead.
    chunk = max(1, min(8, len(entries) // (16 * max(workers, 1))))
    return ordered_map(functools.partial(make_record, settings=settings), entries, workers, chunk,
                       threads=cv2 is not None)
