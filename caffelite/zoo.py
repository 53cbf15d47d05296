"""The model zoo: ready net definitions, and their trained weights fetched safely.

Every folder ``model_zoo/<name>/`` holds net files (``deploy.yaml``,
``train_val.yaml``, ``solver.yaml`` where the original has them) and a
``README.md`` whose YAML front matter is the manifest entry, with Caffe's keys
plus a few of ours::

    ---
    name: BVLC CaffeNet Model                  # a title
    caffemodel: bvlc_reference_caffenet.caffemodel
    caffemodel_url: http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel
    mirrors: []                                # other full URLs tried after caffemodel_url
    sha1: 4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46
    sha256: null                               # checked too when given
    size: null                                 # bytes, when known
    parameters: 60965224
    license: unrestricted
    source: https://github.com/BVLC/caffe/tree/master/models/bvlc_reference_caffenet
    accuracy: {dataset: ILSVRC-2012 val, top1: 0.574, top5: 0.804}
    ---

Downloads go to ``<cache>/<name>/<caffemodel>``; the cache is ``--dir``, else
``$CAFFELITE_ZOO_DIR``, else ``$XDG_CACHE_HOME/caffelite/zoo`` (``~/.cache``
without it). A download (``caffelite.download.fetch``) resumes a ``.part`` file
with a Range request, retries with exponential backoff, and the file takes its
final name (an atomic rename) only once its checksum matches the manifest. ``zoo:NAME`` given as
weights resolves to that verified file. A ``.verified`` stamp beside it
(size, mtime, hashes) spares re-hashing a file that has not changed.
"""
from __future__ import annotations

import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .download import ChecksumError, DownloadError, fetch, file_hashes
from .download import mismatches as _mismatches
from .errors import ConfigError, DataError, did_you_mean
from .log import get_logger

log = get_logger("zoo")

ZOO_PREFIX = "zoo:"
DEFINITION_FILES = ("deploy.yaml", "train_val.yaml", "solver.yaml")


# ---- the manifest -------------------------------------------------------------------
@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo, as its README front matter describes it."""

    name: str
    folder: Path
    title: str = ""
    caffemodel: str | None = None
    url: str | None = None
    mirrors: tuple[str, ...] = ()
    sha1: str | None = None
    sha256: str | None = None
    size: int | None = None
    parameters: int | None = None
    license: str | None = None
    source: str | None = None
    accuracy: object = None
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_weights(self) -> bool:
        return bool(self.caffemodel and self.url)

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha1 or self.sha256)

    @property
    def checksums(self) -> dict[str, str]:
        """The published checksums, by kind."""
        return {kind: want for kind, want in (("sha1", self.sha1), ("sha256", self.sha256)) if want}

    def definitions(self) -> list[str]:
        """The net and solver files of this model folder."""
        return sorted(p.name for p in self.folder.glob("*.yaml"))


def zoo_root() -> Path:
    """The folder of model definitions: ``$CAFFELITE_MODEL_ZOO``, else the checkout's ``model_zoo/``."""
    env = os.environ.get("CAFFELITE_MODEL_ZOO")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / "model_zoo"
    if not root.is_dir():
        raise ConfigError(f"model zoo folder '{root}' not found",
                          hint="set CAFFELITE_MODEL_ZOO to the model_zoo/ folder of a caffelite checkout")
    return root


def read_front_matter(path: Path) -> dict:
    """The YAML between the leading ``---`` lines of a README."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the model README ({exc})", file=str(path)) from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise ConfigError("the README has no front matter", file=str(path),
                          hint="start it with a '---' line, the YAML fields, and another '---' line")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ConfigError("the front matter is not closed", file=str(path), hint="end it with a '---' line") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed front matter: {exc}", file=str(path)) from None
    if not isinstance(meta, dict):
        raise ConfigError("the front matter must be a mapping of fields", file=str(path))
    return meta


def _model_from_meta(name: str, folder: Path, meta: dict) -> ZooModel:
    readme = str(folder / "README.md")

    def text(key):
        value = meta.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{key}' must be a single value", file=readme)
        return None if value in (None, "") else str(value)

    def digest(key, length):
        value = text(key)
        if value is not None and (len(value) != length or any(ch not in "0123456789abcdef" for ch in value.lower())):
            raise ConfigError(f"'{key}' must be {length} hex digits, got '{value}'", file=readme)
        return value.lower() if value else None

    def number(key):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"'{key}' must be a whole number, got '{value}'", file=readme)
        return value

    mirrors = meta.get("mirrors") or []
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    return ZooModel(name=name, folder=folder, title=text("name") or name, caffemodel=text("caffemodel"),
                    url=text("caffemodel_url"), mirrors=tuple(str(m) for m in mirrors),
                    sha1=digest("sha1", 40), sha256=digest("sha256", 64), size=number("size"),
                    parameters=number("parameters"), license=text("license"), source=text("source"),
                    accuracy=meta.get("accuracy"), meta=meta)


def load_manifest(root: Path | None = None) -> dict[str, ZooModel]:
    """Every model of the zoo by name (its folder's name), in name order."""
    root = Path(root) if root is not None else zoo_root()
    models = {}
    for readme in sorted(root.glob("*/README.md")):
        folder = readme.parent
        models[folder.name] = _model_from_meta(folder.name, folder, read_front_matter(readme))
    return models


def get_model(name: str, root: Path | None = None) -> ZooModel:
    models = load_manifest(root)
    if name not in models:
        raise ConfigError(f"no model '{name}' in the model zoo",
                          hint=did_you_mean(name, models) or "see `caffelite zoo list`")
    return models[name]


# ---- the cache ------------------------------------------------------------------------
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$CAFFELITE_ZOO_DIR``, else the user's cache folder + ``caffelite/zoo``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("CAFFELITE_ZOO_DIR"):
        return Path(os.environ["CAFFELITE_ZOO_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "caffelite" / "zoo"


def cached_path(model: ZooModel, cache: str | os.PathLike | None = None) -> Path:
    if not model.caffemodel:
        raise ConfigError(f"model '{model.name}' publishes no trained weights",
                          hint=f"train it instead: caffelite train --solver {model.folder / 'solver.yaml'}")
    return cache_dir(cache) / model.name / model.caffemodel


def mismatches(model: ZooModel, hashes: dict[str, str]) -> list[str]:
    """'sha1 expected X, got Y' for every published checksum the hashes fail."""
    return _mismatches(model.checksums, hashes)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_stamp(path: Path, hashes: dict[str, str], trusted: bool) -> None:
    from .io.atomic import write_text  # noqa: PLC0415

    st = path.stat()
    write_text(_stamp_path(path), json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                              "trusted": trusted, **hashes}))


def _read_stamp(path: Path) -> dict | None:
    """The stamp of ``path`` if it still describes the file (same size and mtime)."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if stamp.get("size") != st.st_size or stamp.get("mtime_ns") != st.st_mtime_ns:
        return None
    return stamp


def cache_status(model: ZooModel, cache: str | os.PathLike | None = None) -> str:
    """'verified', 'trusted' (no published checksum), 'unverified', 'missing' or 'n/a' (no weights)."""
    if not model.has_weights:
        return "n/a"
    path = cached_path(model, cache)
    if not path.is_file():
        return "missing"
    stamp = _read_stamp(path)
    if stamp is None:
        return "unverified"
    if model.has_checksum:
        return "unverified" if mismatches(model, stamp) else "verified"
    return "trusted" if stamp.get("trusted") else "unverified"


def verify_cached(model: ZooModel, cache: str | os.PathLike | None = None) -> Path | None:
    """The cached file when it matches the manifest (hashing it if its stamp is stale), else None."""
    path = cached_path(model, cache)
    if not path.is_file():
        return None
    status = cache_status(model, cache)
    if status in ("verified", "trusted"):
        return path
    if not model.has_checksum:
        return None
    hashes = file_hashes(path)
    if mismatches(model, hashes):
        return None
    _write_stamp(path, hashes, trusted=False)
    return path


def is_zoo_spec(spec: str) -> bool:
    """``zoo:NAME``; also ``folder/zoo:NAME`` that a relative-path rule prefixed and that is no file."""
    spec = os.fspath(spec)
    return spec.startswith(ZOO_PREFIX) or (
        os.path.basename(spec).startswith(ZOO_PREFIX) and not os.path.exists(spec))


def resolve_weights(spec: str, cache: str | os.PathLike | None = None, root: Path | None = None) -> str:
    """``zoo:NAME`` -> the verified cached weights of NAME; any other path is returned as given."""
    spec = os.fspath(spec)
    if not is_zoo_spec(spec):
        return spec
    name = os.path.basename(spec)[len(ZOO_PREFIX):]
    model = get_model(name, root)
    path = cached_path(model, cache)
    found = verify_cached(model, cache)
    if found is not None:
        if not model.has_checksum:
            log.warning("%s has no published checksum; using the file you kept with --trust-unverified", path)
        return str(found)
    if path.is_file() and not model.has_checksum:
        raise ConfigError(f"no checksum is known for '{name}', so {path} cannot be verified",
                          hint=f"accept it with `caffelite zoo download {name} --trust-unverified`")
    if path.is_file():
        raise DataError(f"the cached weights of '{name}' do not match the model zoo's checksum", file=str(path),
                        hint=f"delete the file and run `caffelite zoo download {name}`")
    raise ConfigError(f"the weights of '{name}' are not downloaded yet (looked for {path})",
                      hint=f"run `caffelite zoo download {name}` first")


# ---- downloading -----------------------------------------------------------------------
def mirror_url(url: str, base: str) -> str:
    """``url`` with its scheme and host replaced by ``base`` (whose own path, if any, is prefixed)."""
    src, dst = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    if not dst.scheme or not dst.netloc:
        raise ConfigError(f"--mirror '{base}' is not a base URL",
                          hint="for example --mirror https://mirror.example.org")
    return urllib.parse.urlunsplit((dst.scheme, dst.netloc, dst.path.rstrip("/") + src.path, src.query, ""))


def download(model: ZooModel, cache: str | os.PathLike | None = None, mirror: str | None = None, *,
             timeout: float = 30.0, retries: int = 5, backoff: float = 1.0, progress: bool | None = None,
             trust_unverified: bool = False, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Fetch ``model``'s weights into the cache (if not already there and verified); returns the path."""
    if not model.has_weights:
        raise ConfigError(f"model '{model.name}' publishes no trained weights",
                          hint=f"train it instead: caffelite train --solver {model.folder / 'solver.yaml'}")
    final = cached_path(model, cache)
    found = verify_cached(model, cache)
    if found is not None:
        log.info("%s is already downloaded and verified: %s", model.name, found)
        return found
    if not model.has_checksum and not trust_unverified:
        raise ConfigError(f"no checksum is known for '{model.name}', so its download cannot be verified",
                          hint="to download it and keep it anyway, run again with --trust-unverified; "
                               "its sha1 and sha256 are then shown for you to compare with a source you trust")
    urls = [mirror_url(model.url, mirror)] if mirror else [model.url, *model.mirrors]
    try:
        # fetch keeps a file already there that matches; with no checksum (--trust-unverified) any file.
        got = fetch(urls, final, model.checksums, timeout=timeout, retries=retries, backoff=backoff,
                    progress=progress, hash_kinds=("sha1", "sha256"), sleep=sleep)
    except DownloadError as exc:
        raise DataError(
            f"cannot download the weights of '{model.name}': {'; '.join(exc.failures)}. If this machine is "
            f"offline, fetch {model.url} by hand and put it at {final}, then run `caffelite zoo download "
            f"{model.name}` again to verify it", hint="--mirror BASE_URL fetches the same path from another host"
        ) from None
    except ChecksumError as exc:
        hint = "the server or a proxy sent other bytes; try again later or another --mirror"
        raise ChecksumError(exc.message, exc.failures, hint=hint) from None
    if not model.has_checksum:
        log.warning("%s has no published checksum; kept unverified (sha1 %s, sha256 %s)",
                    final, got.hashes["sha1"], got.hashes["sha256"])
    _write_stamp(final, got.hashes, trusted=not model.has_checksum)
    if got.url is not None:
        log.info("Saved %s (sha1 %s)", final, got.hashes["sha1"])
    return final


__all__ = ["ZooModel", "load_manifest", "get_model", "zoo_root", "cache_dir", "cached_path", "cache_status",
           "verify_cached", "resolve_weights", "is_zoo_spec", "download", "mirror_url", "file_hashes"]
