"""``caffelite zoo``: list the model zoo, show a model, download its weights safely.

    caffelite zoo list [--dir DIR]
    caffelite zoo info NAME [--dir DIR]
    caffelite zoo download NAME [NAME ...] [--dir DIR] [--mirror BASE_URL]
                           [--timeout S] [--retries N] [--trust-unverified]

Downloads resume, retry, and are checked against the manifest's sha1/sha256
before they take their final name; a mismatch deletes the download and exits
with status 3. ``--weights zoo:NAME`` then uses the verified file.
"""
from __future__ import annotations

import argparse

from ..cli import _flag

COMMAND = "zoo"
HELP = "list the model zoo, show a model, or download its trained weights (checksum-verified)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", metavar="ACTION")
    parser.set_defaults(zoo_help=parser.format_help)

    def common(p):
        _flag(p, "dir", default=None, help="weights cache (default: $CAFFELITE_ZOO_DIR, else "
                                           "$XDG_CACHE_HOME/caffelite/zoo or ~/.cache/caffelite/zoo)")
        # Accept --debug after the action too, without overriding one given before it.
        _flag(p, "debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    common(sub.add_parser("list", help="every model with its weights' size, license and cache status"))
    info = sub.add_parser("info", help="everything the zoo knows about one model")
    info.add_argument("name", metavar="NAME")
    common(info)
    get = sub.add_parser("download", help="download (or verify) a model's trained weights")
    get.add_argument("names", nargs="+", metavar="NAME")
    common(get)
    _flag(get, "mirror", default=None, metavar="BASE_URL",
          help="fetch the same path from this scheme://host instead (the checksum is still checked)")
    _flag(get, "timeout", type=float, default=30.0, help="seconds without data before a try fails (default 30)")
    _flag(get, "retries", type=int, default=5, help="tries after the first, with exponential backoff (default 5)")
    get.add_argument("--trust-unverified", "--trust_unverified", "-trust_unverified", dest="trust_unverified",
                     action="store_true", help="keep a download that has no published checksum to check it against")


def run(args) -> int:
    action = getattr(args, "zoo_command", None)
    if action is None:
        print(args.zoo_help())
        return 2
    return {"list": _list, "info": _info, "download": _download}[action](args)


# ---- actions ---------------------------------------------------------------------------
def _size(model) -> str:
    if not model.has_weights:
        return "-"
    if model.size:
        return _human(model.size)
    if model.parameters:
        return "~" + _human(4 * model.parameters)  # float32 weights dominate a .caffemodel
    return "?"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


CACHED = {"verified": "yes", "trusted": "yes (no checksum)", "unverified": "unverified", "missing": "no",
          "n/a": "- (no weights)"}


def _list(args) -> int:
    from ..zoo import cache_dir, cache_status, load_manifest  # noqa: PLC0415

    rows = [("NAME", "SIZE", "LICENSE", "CACHED", "DEFINITIONS")]
    for name, model in load_manifest().items():
        files = " ".join(f.removesuffix(".yaml") for f in model.definitions())
        license_ = model.license or "?"
        license_ = license_ if len(license_) <= 28 else license_[:25] + "..."
        rows.append((name, _size(model), license_, CACHED[cache_status(model, args.dir)], files))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"\ncache: {cache_dir(args.dir)}  (sizes with ~ are estimated from the parameter count)")
    return 0


def _info(args) -> int:
    from ..zoo import cache_status, cached_path, get_model  # noqa: PLC0415

    model = get_model(args.name)
    fields = [("name", model.name), ("title", model.title), ("folder", str(model.folder)),
              ("definitions", ", ".join(model.definitions()) or "-"), ("license", model.license),
              ("license_url", model.meta.get("license_url")),
              ("source", model.source), ("parameters", f"{model.parameters:,}" if model.parameters else None),
              ("accuracy", _accuracy(model.accuracy)), ("caffemodel", model.caffemodel),
              ("caffemodel_url", model.url), ("mirrors", ", ".join(model.mirrors) or None),
              ("size", _size(model)), ("sha1", model.sha1 or ("none published" if model.has_weights else None)),
              ("sha256", model.sha256)]
    if model.has_weights:
        fields += [("cached", f"{CACHED[cache_status(model, args.dir)]} ({cached_path(model, args.dir)})"),
                   ("use", f"--weights zoo:{model.name}")]
    width = max(len(k) for k, v in fields if v)
    for key, value in fields:
        if value:
            print(f"{key.ljust(width)}  {value}")
    return 0


def _accuracy(value) -> str | None:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return None if value is None else str(value)


def _download(args) -> int:
    from ..zoo import download, get_model  # noqa: PLC0415

    if args.retries < 0 or args.timeout <= 0:
        from ..errors import ConfigError  # noqa: PLC0415

        raise ConfigError("--retries must be >= 0 and --timeout > 0")
    models = [get_model(name) for name in args.names]  # every name checked before any download
    for model in models:
        path = download(model, args.dir, args.mirror, timeout=args.timeout, retries=args.retries,
                        trust_unverified=args.trust_unverified)
        print(path)
    return 0
