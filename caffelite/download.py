"""Fetch a URL to a file, safely: resumable, retried, checksum-verified, atomic.

    from caffelite.download import fetch
    got = fetch([url, mirror_url], Path("data/file.gz"), {"md5": {"9fb6...", "4bec..."}})
    got.path, got.url, got.hashes      # url is None when a matching file was already there

The bytes go to ``<dest>.part`` first. A dropped or stalled transfer (``timeout``
seconds without data) is retried with exponential backoff and resumed with a Range
request; a resumed file that fails its checksum is fetched once more from the start.
``dest`` takes its final name (an atomic rename) only once every given checksum
matches: each maps md5 / sha1 / sha256 to the accepted hex digest, or a set of
them. A ``dest`` already there that matches is kept and nothing is fetched. URLs are
tried in order; when none delivers the file, ``DownloadError`` lists why for each
(the caller says what to do offline), and ``ChecksumError`` when one sent other
bytes. One process at a time downloads a file (a lock beside it, POSIX only).
On a terminal a tqdm bar shows the progress.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .errors import DataError
from .io.atomic import fsync_folder
from .log import get_logger

log = get_logger("download")

CHUNK = 1 << 20
USER_AGENT = "caffelite/0.1"
ALGORITHMS = ("md5", "sha1", "sha256")

Checksums = Mapping[str, "str | Iterable[str] | None"]


# ---- checksums -------------------------------------------------------------------------
def _accepted(checksums: Checksums | None) -> dict[str, set[str]]:
    """{kind: accepted lower-case digests}, kinds without a value left out."""
    accepted = {}
    for kind, want in (checksums or {}).items():
        if kind not in ALGORITHMS:
            raise ValueError(f"unknown checksum kind '{kind}' (known: {', '.join(ALGORITHMS)})")
        values = {want} if isinstance(want, str) else set(want or ())
        if values:
            accepted[kind] = {v.lower() for v in values}
    return accepted


def file_hashes(path: str | os.PathLike, kinds: Iterable[str] = ("sha1", "sha256")) -> dict[str, str]:
    """{kind: hex digest} of the file, reading it once."""
    digests = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for digest in digests.values():
                digest.update(chunk)
    return {kind: digest.hexdigest() for kind, digest in digests.items()}


def mismatches(checksums: Checksums | None, hashes: Mapping[str, str]) -> list[str]:
    """'sha1 expected X, got Y' (or 'expected X or Z') for every checksum ``hashes`` fails."""
    return [f"{kind} expected {' or '.join(sorted(want))}, got {hashes.get(kind)}"
            for kind, want in _accepted(checksums).items() if hashes.get(kind) not in want]


def verify(path: str | os.PathLike, checksums: Checksums | None) -> list[str]:
    """The checksums the file fails (empty when it matches them all)."""
    return mismatches(checksums, file_hashes(path, _accepted(checksums)))


# ---- errors --------------------------------------------------------------------------------
class FetchError(DataError):
    """No URL delivered the file; ``failures`` says why, one ``"URL: reason"`` each."""

    def __init__(self, message: str, failures: list[str], *, hint: str | None = None):
        self.failures = failures
        super().__init__(message, hint=hint)


class DownloadError(FetchError):
    """No URL could be fetched (offline, 404, gave up after the retries)."""


class ChecksumError(FetchError):
    """A URL sent bytes that fail the checksum (they were deleted), and no other sent the right ones."""


@dataclass
class Fetched:
    path: Path
    url: str | None  # None: the file was already there and matched
    hashes: dict[str, str] = field(default_factory=dict)


# ---- one transfer ----------------------------------------------------------------------------
class _Retry(Exception):
    """A failure worth another attempt (timeouts, dropped connections, 5xx)."""


class _GiveUp(Exception):
    """A failure another attempt at the same URL will not fix (404, 403, no DNS)."""


class _Progress:
    """A tqdm bar on a terminal; a log line every quarter in a pipe; nothing when disabled."""

    def __init__(self, label: str, enabled: bool | None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.done = self.total = 0
        self.quarter = 0

    def start(self, total: int | None, initial: int) -> None:
        self.close()
        self.done, self.total = initial, total or 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.label, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.total and self.done * 4 // self.total > self.quarter:
            self.quarter = self.done * 4 // self.total
            log.info("%s: %d of %d bytes", self.label, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes START-END/TOTAL`` or ``bytes */TOTAL``."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _transfer(url: str, part: Path, timeout: float, progress: _Progress) -> None:
    """One attempt: fetch ``url`` into ``part``, resuming what is there."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(Exception):
            exc.close()
        if exc.code == 416 and offset:
            if _content_range(exc.headers.get("Content-Range"))[1] == offset:
                return  # the partial file is already complete
            part.unlink()
            raise _Retry("the partial file does not fit the server's file; starting over") from None
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Retry(reason) from None
        raise _GiveUp(reason) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):
            raise _GiveUp(f"cannot resolve the host ({exc.reason})") from None
        raise _Retry(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets
        raise _Retry(str(exc) or type(exc).__name__) from None
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"the server sent bytes from {start} instead of {offset}; starting over")
            mode = "ab"
        elif resp.status == 200:
            if offset:
                log.info("%s ignores Range requests; downloading from the start", url)
            offset, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        else:
            raise _GiveUp(f"unexpected HTTP status {resp.status}")
        expected = offset + int(length) if length and length.isdigit() else total
        progress.start(expected, offset)
        try:
            # read1 returns what has arrived: bytes received before a stall are kept for the resume.
            read = getattr(resp, "read1", resp.read)
            with open(part, mode) as f:
                while chunk := read(CHUNK):
                    f.write(chunk)
                    progress.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, (PermissionError, IsADirectoryError)) or getattr(exc, "errno", None) == errno.ENOSPC:
                # Disk full or not writable: no retry helps.
                raise DataError(f"cannot write the download ({exc})", file=str(part)) from None
            raise _Retry(f"transfer interrupted ({exc or type(exc).__name__})") from None
        finally:
            progress.close()
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise _Retry(f"connection closed after {got} of {expected} bytes")


def _fetch_with_retries(url: str, part: Path, *, timeout: float, retries: int, backoff: float,
                        progress: _Progress, sleep: Callable[[float], None]) -> None:
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress)
            return
        except _Retry as exc:
            if attempt == retries:
                raise _GiveUp(f"{exc} (gave up after {retries + 1} attempts)") from None
            delay = min(backoff * 2 ** attempt, 60.0)
            log.warning("download from %s failed: %s; retrying in %.1f s (attempt %d of %d)",
                        url, exc, delay, attempt + 2, retries + 1)
            sleep(delay)


@contextlib.contextmanager
def _lock(path: Path):
    """One download per file at a time (POSIX ``flock`` on ``path``, removed afterwards);
    elsewhere no lock."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:
        yield
        return
    while True:
        f = open(path, "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("another process is downloading into %s; waiting for it", path.parent)
                fcntl.flock(f, fcntl.LOCK_EX)
            # The holder before us removes the file on its way out: then lock the one now there.
            try:
                held = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                held = False
        except BaseException:
            f.close()
            raise
        if held:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        f.close()  # releases the lock


# ---- the download ----------------------------------------------------------------------------
def _fetch_and_hash(url: str, part: Path, accepted: dict, kinds: list[str], label: str, progress: bool | None,
                    **retry) -> dict[str, str]:
    """Fetch ``url`` into ``part`` (resuming it) and hash it. A resumed file that fails its checksum
    is fetched once more from the start: the old .part may come from another version of the file."""
    resumed = part.exists()
    _fetch_with_retries(url, part, progress=_Progress(label, progress), **retry)
    hashes = file_hashes(part, kinds)
    if resumed and mismatches(accepted, hashes):
        log.warning("the resumed download of %s does not match its checksum; downloading it again", label)
        part.unlink()
        _fetch_with_retries(url, part, progress=_Progress(label, progress), **retry)
        hashes = file_hashes(part, kinds)
    return hashes


def fetch(urls: str | Sequence[str], dest: str | os.PathLike, checksums: Checksums | None = None, *,
          timeout: float = 30.0, retries: int = 5, backoff: float = 1.0, progress: bool | None = None,
          hash_kinds: Iterable[str] = (), sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """Fetch ``dest`` from the first of ``urls`` that delivers it whole and matching ``checksums``
    (kept as is when it already matches). ``hashes`` of the result cover the checked kinds and
    ``hash_kinds``. ``retries``: attempts per URL after the first; ``progress``: None = on a terminal."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    accepted = _accepted(checksums)
    kinds = list(dict.fromkeys([*accepted, *hash_kinds]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []  # "URL: reason" for every URL, in order
    unreachable, wrong = [], []  # the same, split into URLs that failed and that sent other bytes
    with _lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():
            hashes = file_hashes(dest, kinds)
            if not mismatches(accepted, hashes):
                log.info("%s is already there and matches its checksum", dest)
                return Fetched(dest, None, hashes)
            log.warning("%s does not match its checksum; downloading it again", dest)
        for url in urls:
            log.info("Downloading %s from %s", dest.name, url)
            try:
                hashes = _fetch_and_hash(url, part, accepted, kinds, dest.name, progress, timeout=timeout,
                                         retries=retries, backoff=backoff, sleep=sleep)
            except _GiveUp as exc:
                failures.append(f"{url}: {exc}")
                unreachable.append(failures[-1])
                continue
            bad = "; ".join(mismatches(accepted, hashes))
            if not bad:
                os.replace(part, dest)
                fsync_folder(dest)
                return Fetched(dest, url, hashes)
            part.unlink()
            failures.append(f"{url}: checksum mismatch ({bad})")
            wrong.append(f"from {url}: {bad}")
    if wrong:
        also = "".join(f"; also {failure}" for failure in unreachable)
        raise ChecksumError(f"checksum mismatch for {dest.name} {'; '.join(wrong)}{also}. "
                            f"The download was deleted", failures,
                            hint="the server or a proxy sent other bytes; try again later")
    raise DownloadError(f"cannot download {dest.name}: {'; '.join(failures)}", failures)


__all__ = ["fetch", "Fetched", "FetchError", "DownloadError", "ChecksumError", "file_hashes", "mismatches",
           "verify", "ALGORITHMS"]
