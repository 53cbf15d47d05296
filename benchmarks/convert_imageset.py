"""convert_imageset throughput: one worker against all of them, in the same run.

    python benchmarks/convert_imageset.py [--images 400] [--size 256] [--resize 227] [--decoder auto]

Writes N photo-like JPEGs (smooth gradients and shapes plus noise, quality 90)
to a temporary folder, then times ``caffelite convert_imageset`` on them with
``--workers 1`` and with ``--workers <all cores>`` (resizing to --resize, raw
Datums), alternating, best of --repeat runs each, and prints images/s and the
speed-up. The workers are threads with OpenCV and processes with Pillow
(caffelite/data/imageset.py says why).
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caffelite.cli import main  # noqa: E402
from caffelite.data.imageset import opencv  # noqa: E402


def make_images(folder: str, count: int, size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lines = []
    for i in range(count):
        a, b, c = rng.uniform(0, 255, 3)
        image = np.stack([a * x + (255 - a) * y, b * (1 - x) * y + 40, c * (x * y) + 20], axis=-1)
        cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        image[disc] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        name = f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, name), quality=90)
        lines.append(f"{name} {i % 10}\n")
    listfile = os.path.join(folder, "list.txt")
    with open(listfile, "w") as f:
        f.writelines(lines)
    return listfile


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def time_convert(root: str, listfile: str, db: str, workers: int, args) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the main process, CPU seconds of the workers) of one conversion."""
    argv = ["convert_imageset", "--force", "--workers", str(workers), "--decoder", args.decoder]
    if args.resize:
        argv += ["--resize_height", str(args.resize), "--resize_width", str(args.resize)]
    own, children = cpu_seconds()
    start = time.perf_counter()
    rc = main(argv + [root + "/", listfile, db])
    elapsed = time.perf_counter() - start
    own_after, children_after = cpu_seconds()
    if rc != 0:
        raise SystemExit(f"convert_imageset failed with exit status {rc}")
    return elapsed, own_after - own, children_after - children


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--resize", type=int, default=227, help="0: keep the size")
    parser.add_argument("--decoder", choices=("auto", "opencv", "pillow"), default="auto")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    decoder = args.decoder if args.decoder != "auto" else ("opencv" if opencv() else "pillow")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "images")
        os.makedirs(root)
        listfile = make_images(root, args.images, args.size)
        main(["convert_imageset", "--workers", "1", root + "/", listfile, os.path.join(tmp, "warm")])  # warm the cache
        logging.getLogger("caffelite").setLevel(logging.WARNING)
        runs = {1: [], args.workers: []}
        for _ in range(args.repeat):  # alternating: a change in the machine's load hits both
            for workers in runs:
                runs[workers].append(time_convert(root, listfile, os.path.join(tmp, "db"), workers, args))
        results = {workers: min(times, key=lambda r: r[0]) for workers, times in runs.items()}
    print(f"convert_imageset: {args.images} JPEGs {args.size}x{args.size} -> "
          f"{'raw ' + str(args.resize) + 'x' + str(args.resize) if args.resize else 'raw, same size'}, "
          f"decoder {decoder}, {os.cpu_count()} cores")
    n = args.images
    for workers, (seconds, own, children) in results.items():
        print(f"  --workers {workers:<3d} {n / seconds:8.1f} images/s  ({seconds:.3f} s; CPU per image: "
              f"main {own / n * 1e3:.2f} ms, workers {children / n * 1e3:.2f} ms)")
    print(f"  speed-up {results[1][0] / results[args.workers][0]:.2f}x  (load average {os.getloadavg()[0]:.1f}: "
          "other processes on the machine lower it)")
    # What the cores could give if nothing else ran: all CPU time spread over the cores, unless
    # a single-threaded main process (the writer beside a process pool) is busier still.
    single = sum(results[1][1:])
    _, own, children = results[args.workers]
    spread = (own + children) / min(args.workers + 1, os.cpu_count() or 1)
    bound = single / (max(own, spread) if children else spread)
    print(f"  CPU-time bound on an idle machine: {bound:.2f}x")


if __name__ == "__main__":
    run()
