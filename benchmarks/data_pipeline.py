"""Images/s of the Data layer on encoded JPEGs, next to a bare decode loop, in one run.

Builds (in a temporary folder) an LMDB of encoded 256x256 JPEG Datums, then
measures, alternating, with the medians of several repetitions:

- bare decode: a plain loop decoding every record with the decoder the Data
  layer uses, in one thread and in as many threads as the layer has workers
  (the machine's decode limit), two ways: Pillow's ``Image.open(...).load()``
  alone (the pixels stay inside Pillow: the strictest baseline), and
  caffelite's ``decode_image`` (to the C x H x W BGR array a net needs);
- the Data layer: TRAIN phase, crop 227, mirror, mean_value (or --mean-file),
  batch 64, prefetching with all its workers (``$CAFFELITE_DATA_WORKERS``,
  default one per CPU), timed over ``forward`` calls as a net would make them.

Besides images/s it prints the CPU time per image (all threads of the
process): on a machine whose cores other work shares, the ratio of CPU costs
says what the rate ratio would be on idle cores.

    python benchmarks/data_pipeline.py [--images 320] [--batches 30] [--reps 3] [--mean-file]

Goal: the layer reaches >= 85% of the bare decode rate (all workers) on 2 cores.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from caffelite.data.datum import decode_image  # noqa: E402
from caffelite.data.lmdb_source import iter_records, write_lmdb  # noqa: E402
from caffelite.data.prefetch import default_workers  # noqa: E402
from caffelite.io.binaryproto import write_binaryproto  # noqa: E402
from caffelite.layers.base import TRAIN, LayerContext  # noqa: E402
from caffelite.blob import Blob  # noqa: E402
from caffelite.proto import pb  # noqa: E402
from caffelite.registry import LAYERS  # noqa: E402
import caffelite.layers  # noqa: E402,F401 - registers the layer types

SIZE, CROP, BATCH = 256, 227, 64


def photo_like(rng: np.random.Generator) -> np.ndarray:
    """A 256x256 RGB image with smooth shading, edges and texture (JPEG ~28 KB at quality 90)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.empty((SIZE, SIZE, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 8, 2).tolist() + [rng.uniform(0, 6)]
        image[..., c] = 128 + 90 * np.sin(fx * x * 6 + phase) * np.cos(fy * y * 6)
    for _ in range(6):  # a few flat shapes with hard edges
        cx, cy, r = rng.uniform(0, 1, 3)
        image[(x - cx) ** 2 + (y - cy) ** 2 < (r / 3) ** 2] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def build_lmdb(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        out = io.BytesIO()
        Image.fromarray(photo_like(rng)).save(out, "JPEG", quality=90)
        datum = pb.Datum(channels=3, height=SIZE, width=SIZE, label=i % 10,
                         data=out.getvalue(), encoded=True)
        records.append((b"%08d" % i, datum.SerializeToString()))
    db = folder / "jpeg_lmdb"
    write_lmdb(str(db), records)
    return db


def pillow_load(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()  # the pixels stay inside Pillow


def bare_decode(payloads: list[bytes], threads: int, decode=pillow_load) -> tuple[float, float]:
    """(images/s, CPU µs per image) of ``decode`` on every payload in ``threads`` threads."""
    def work(part):
        for data in part:
            decode(data)

    parts = [payloads[i::threads] for i in range(threads)]
    cpu, start = time.process_time(), time.perf_counter()
    if threads == 1:
        work(payloads)
    else:
        pool = [threading.Thread(target=work, args=(part,)) for part in parts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return len(payloads) / wall, cpu / len(payloads) * 1e6


def data_layer(db: Path, mean_file: str | None):
    tp = pb.TransformationParameter(crop_size=CROP, mirror=True)
    if mean_file:
        tp.mean_file = mean_file
    else:
        tp.mean_value.extend([104, 117, 123])
    lp = pb.LayerParameter(name="data", type="Data", top=["data", "label"])
    lp.transform_param.CopyFrom(tp)
    lp.data_param.source = str(db)
    lp.data_param.batch_size = BATCH
    lp.data_param.backend = pb.DataParameter.LMDB
    layer = LAYERS.get("Data")(lp, LayerContext(phase=TRAIN, dtype=np.dtype(np.float32), seed=1))
    top = [Blob(()), Blob(())]
    layer.layer_setup([], top)
    return layer, top


def layer_rate(db: Path, mean_file: str | None, batches: int) -> tuple[float, float]:
    """(images/s, CPU µs per image, all threads) of ``forward`` calls in a steady run.

    The layer is closed afterwards, so its workers do not run into the other measurements.
    """
    layer, top = data_layer(db, mean_file)
    try:
        for _ in range(3):  # let the workers fill the queue once, as in a steady run
            layer.forward([], top)
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(batches):
            layer.forward([], top)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        layer.close()
    return batches * BATCH / wall, cpu / (batches * BATCH) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="JPEGs in the LMDB (default 320)")
    parser.add_argument("--batches", type=int, default=30, help="timed forward calls per repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--mean-file", action="store_true", help="subtract a mean_file, not mean_value")
    args = parser.parse_args(argv)

    workers = default_workers()
    with tempfile.TemporaryDirectory(prefix="caffelite-bench-") as tmp:
        db = build_lmdb(Path(tmp), args.images)
        payloads = []
        for _, value in iter_records(str(db)):
            datum = pb.Datum()
            datum.ParseFromString(value)
            payloads.append(datum.data)
        size = np.mean([len(p) for p in payloads]) / 1024
        mean_file = None
        if args.mean_file:
            mean_file = str(Path(tmp) / "mean.binaryproto")
            write_binaryproto(mean_file, np.full((1, 3, SIZE, SIZE), 120, np.float32))
        print(f"{args.images} JPEGs of {SIZE}x{SIZE} (mean {size:.0f} KB), batch {BATCH}, crop {CROP}, "
              f"mirror, {'mean_file' if mean_file else 'mean_value'}, {workers} data workers")
        runs = {name: [] for name in ("load1", "loadN", "array1", "arrayN", "layer")}
        for _ in range(args.reps):
            runs["load1"].append(bare_decode(payloads, 1))
            runs["loadN"].append(bare_decode(payloads, workers))
            runs["array1"].append(bare_decode(payloads, 1, decode_image))
            runs["arrayN"].append(bare_decode(payloads, workers, decode_image))
            runs["layer"].append(layer_rate(db, mean_file, args.batches))
    med = {name: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for name, v in runs.items()}
    rows = [("load1", "bare decode, Pillow load(), 1 thread"),
            ("loadN", f"bare decode, Pillow load(), {workers} threads"),
            ("array1", "bare decode, decode_image(), 1 thread"),
            ("arrayN", f"bare decode, decode_image(), {workers} threads"),
            ("layer", f"Data layer, {workers} workers")]
    for name, label in rows:
        rate, cpu = med[name]
        print(f"{label + ':':42s}{rate:8.0f} images/s {cpu:6.0f} CPU µs/image")
    layer_rate_, layer_cpu = med["layer"]
    print("layer / bare decode (goal >= 0.85):      rate   CPU cost")
    for name, label in (("loadN", "Pillow load(), pixels left in Pillow"),
                        ("arrayN", "decode_image(), C x H x W BGR arrays")):
        print(f"  vs {label:38s}{layer_rate_ / med[name][0]:5.2f}   {med[name][1] / layer_cpu:5.2f}")
    print("(the CPU-cost ratio is what the rate ratio tends to on idle cores; "
          "other work on the machine skews the rates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
