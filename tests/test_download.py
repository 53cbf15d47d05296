"""caffelite.download against a loopback HTTP server started here: full download, resume,
retries, timeouts, checksums (md5 / sha1 / sha256, several accepted), mirrors, clear errors."""
import hashlib
import http.server
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from caffelite.download import ChecksumError, DownloadError, fetch, file_hashes, mismatches, verify

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))
SHA1 = hashlib.sha1(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class LoopbackServer:
    """Serves ``files`` on 127.0.0.1 with Range support and scripted misbehaviour (``mode``)."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = dict(files or {})
        self.mode = "ok"  # ok | drop_once | stall | stall_once | wrong | ignore_range
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self._once_done = False
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, h):
        rng = h.headers.get("Range")
        self.requests.append((h.path, rng))
        body = self.files.get(h.path)
        if body is None:
            h.send_error(404, "Not Found")
            return
        if self.mode == "wrong":
            body = body[::-1]
        start = 0
        if rng and self.mode != "ignore_range":
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        chunk = body[start:]
        h.send_header("Content-Length", str(len(chunk)))
        h.end_headers()
        misbehave = self.mode in ("drop_once", "stall_once") and not self._once_done or self.mode == "stall"
        if not misbehave:
            h.wfile.write(chunk)
            return
        self._once_done = True
        h.wfile.write(chunk[:len(chunk) // 3])
        h.wfile.flush()
        if self.mode == "drop_once":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.release.wait(10)  # stall until the client gives up (or the test ends)
            h.close_connection = True

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def go_offline(monkeypatch) -> list[str]:
    """Make every request fail as the resolver does on a machine without network; returns the
    list the URLs tried are appended to."""
    tried = []

    def offline(request, *args, **kwargs):
        tried.append(request.full_url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tried


@pytest.fixture
def server():
    with LoopbackServer({"/files/data.bin": PAYLOAD}) as srv:
        yield srv


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "out" / "data.bin"


def get(server, dest, checksums=None, path="/files/data.bin", **kw):
    kw.setdefault("sleep", lambda s: None)
    urls = [server.base + p for p in ([path] if isinstance(path, str) else path)]
    return fetch(urls, dest, {"sha1": SHA1} if checksums is None else checksums, progress=False,
                 timeout=kw.pop("timeout", 5), **kw)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- transfers ---------------------------------------------------------------------------
def test_full_download_is_verified_and_renamed(server, dest):
    got = get(server, dest, hash_kinds=["sha256"])
    assert got.path == dest and got.url == server.base + "/files/data.bin"
    assert dest.read_bytes() == PAYLOAD
    assert got.hashes == {"sha1": SHA1, "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    assert leftovers(dest.parent) == ["data.bin"]  # no .part, no lock
    assert server.requests == [("/files/data.bin", None)]


def test_resume_after_dropped_connection(server, dest):
    server.mode = "drop_once"
    delays = []
    assert get(server, dest, backoff=0.5, sleep=delays.append).path.read_bytes() == PAYLOAD
    (_, first), (_, second) = server.requests
    assert first is None and second == f"bytes={len(PAYLOAD) // 3}-"  # resumed, not restarted
    assert delays == [0.5]


def test_stalled_transfer_resumes_after_timeout(server, dest):
    server.mode = "stall_once"
    assert get(server, dest, timeout=0.3).path.read_bytes() == PAYLOAD
    assert server.requests[1][1] == f"bytes={len(PAYLOAD) // 3}-"


def test_server_ignoring_range_restarts_from_zero(server, dest):
    dest.parent.mkdir()
    dest.with_name("data.bin.part").write_bytes(b"x" * 1000)
    server.mode = "ignore_range"
    assert get(server, dest).path.read_bytes() == PAYLOAD
    assert server.requests == [("/files/data.bin", "bytes=1000-")]


def test_stale_partial_file_is_fetched_again_cleanly(server, dest):
    dest.parent.mkdir()
    dest.with_name("data.bin.part").write_bytes(b"x" * 1000)  # left by a download of another version
    assert get(server, dest).path.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == ["bytes=1000-", None]


def test_stalling_server_times_out_retries_and_gives_up(server, dest):
    server.mode = "stall"
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        get(server, dest, timeout=0.2, retries=2, backoff=0.01, sleep=time.sleep)
    assert time.monotonic() - start < 5
    assert "gave up after 3 attempts" in str(info.value) and "timed out" in str(info.value)
    assert len(server.requests) == 3
    assert [r is None for _, r in server.requests] == [True, False, False]  # each retry resumed
    assert leftovers(dest.parent) == ["data.bin.part"]  # kept for the next run to resume


# ---- checksums ---------------------------------------------------------------------------
def test_wrong_bytes_fail_with_both_hashes_and_leave_nothing(server, dest):
    server.mode = "wrong"
    with pytest.raises(ChecksumError) as info:
        get(server, dest, retries=0)
    message = str(info.value)
    assert f"checksum mismatch for data.bin from {server.base}/files/data.bin" in message
    assert f"sha1 expected {SHA1}, got {hashlib.sha1(PAYLOAD[::-1]).hexdigest()}" in message
    assert "The download was deleted" in message
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("kind", ["md5", "sha1", "sha256"])
def test_every_checksum_kind_is_checked(server, dest, kind):
    digest = hashlib.new(kind, PAYLOAD).hexdigest()
    assert get(server, dest, {kind: digest.upper()}).hashes == {kind: digest}
    dest.unlink()
    with pytest.raises(ChecksumError, match=rf"{kind} expected 0+, got {digest}"):
        get(server, dest, {kind: "0" * len(digest)})


def test_any_of_several_accepted_digests_passes(server, dest):
    assert get(server, dest, {"md5": {"0" * 32, MD5}}).path.read_bytes() == PAYLOAD
    assert mismatches({"md5": {"b" * 32, "a" * 32}}, {"md5": "c" * 32}) == [
        f"md5 expected {'a' * 32} or {'b' * 32}, got {'c' * 32}"]
    assert verify(dest, {"md5": [MD5], "sha1": SHA1, "sha256": None}) == []
    assert file_hashes(dest, ["md5"]) == {"md5": MD5}
    with pytest.raises(ValueError, match="unknown checksum kind 'crc32'"):
        verify(dest, {"crc32": "0"})


# ---- URLs and errors -----------------------------------------------------------------------
def test_404_is_a_clear_error_without_retries(server, dest):
    with pytest.raises(DownloadError) as info:
        get(server, dest, path="/files/missing.bin")
    assert info.value.failures == [f"{server.base}/files/missing.bin: HTTP 404 Not Found"]
    assert str(info.value).startswith("cannot download data.bin: ")
    assert len(server.requests) == 1


def test_next_url_after_a_missing_file_or_wrong_bytes(server, dest):
    server.files["/bad/data.bin"] = PAYLOAD[::-1]
    got = get(server, dest, path=["/missing/data.bin", "/bad/data.bin", "/files/data.bin"])
    assert got.url == server.base + "/files/data.bin" and dest.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/missing/data.bin", "/bad/data.bin", "/files/data.bin"]
    assert leftovers(dest.parent) == ["data.bin"]


def test_wrong_bytes_from_every_url_name_each(server, dest):
    server.files["/bad/data.bin"] = PAYLOAD[::-1]
    with pytest.raises(ChecksumError) as info:
        get(server, dest, path=["/bad/data.bin", "/missing/data.bin"])
    failures = info.value.failures
    assert failures[0].startswith(f"{server.base}/bad/data.bin: checksum mismatch (sha1 expected {SHA1}")
    assert failures[1] == f"{server.base}/missing/data.bin: HTTP 404 Not Found"
    assert f"; also {failures[1]}. The download was deleted" in str(info.value)


def test_offline_fails_at_once_naming_each_url(monkeypatch, dest):
    tried = go_offline(monkeypatch)
    with pytest.raises(DownloadError) as info:
        fetch(["http://a.invalid/data.bin", "http://b.invalid/data.bin"], dest, sleep=pytest.fail)
    assert tried == ["http://a.invalid/data.bin", "http://b.invalid/data.bin"]  # no retries
    assert info.value.failures == [f"http://{h}.invalid/data.bin: cannot resolve the host ([Errno -3] "
                                   "Temporary failure in name resolution)" for h in "ab"]
    assert leftovers(dest.parent) == []


def test_unreachable_host_names_the_url(dest):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/data.bin"
    with pytest.raises(DownloadError) as info:
        fetch(dead, dest, retries=1, backoff=0.0, progress=False)
    assert info.value.failures[0].startswith(f"{dead}: ") and "gave up after 2 attempts" in str(info.value)


# ---- a file already there ----------------------------------------------------------------
def test_matching_file_is_kept_without_a_request(server, dest):
    get(server, dest)
    server.requests.clear()
    got = get(server, dest)
    assert got.url is None and got.hashes == {"sha1": SHA1}
    assert server.requests == []


def test_corrupt_file_is_replaced(server, dest):
    dest.parent.mkdir()
    dest.write_bytes(PAYLOAD[:-1] + b"!")
    assert get(server, dest).url is not None
    assert dest.read_bytes() == PAYLOAD
