"""Training metrics in the run folder: metrics.csv, metrics.jsonl and TensorBoard event files.

``RunRecorder`` is a solver callback. Every display writes a train row
(iteration, learning rate, smoothed loss, the train net's outputs) and every
test a test row (the test net's averaged outputs)::

    metrics.csv     iteration,wall_time,phase,lr,loss,train/<output>...,test/<output>...
    metrics.jsonl   {"iteration": 100, "wall_time": ..., "phase": "train", "lr": 0.01,
                     "loss": 0.27, "outputs": {"loss": 0.27}}
    events.out.tfevents.<time>.<host>.<pid>.<n>.caffelite   scalars train/smoothed_loss,
                     train/lr, train/<output>, test/<output> (test<i>/ for test net i > 0)

Outputs with several values get ``_<k>`` suffixes; test net i > 0 writes
``test<i>/...``. Rows are appended and flushed as they come (a kill loses at
most the last, partial line, which readers skip). A resumed run first drops
the rows from its resume iteration on (they are about to be redone) and writes
a TensorBoard SessionLog START at that step, which makes TensorBoard discard
the orphaned points of the interrupted run.

The event files are written here without TensorFlow: records framed as
``uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data)``
holding ``Event`` messages (caffelite/proto/tensorboard.proto).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import struct
import time

import numpy as np

from .io.atomic import write_text

log = logging.getLogger(__name__)

CSV_NAME, JSONL_NAME = "metrics.csv", "metrics.jsonl"
FIXED_COLUMNS = ["iteration", "wall_time", "phase", "lr", "loss"]


# ---- crc32c (Castagnoli), table driven ------------------------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masking: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def read_records(path: str):
    """The payloads of a TFRecord file; stops at a truncated or corrupt record."""
    with open(path, "rb") as f:
        raw = f.read()
    pos = 0
    while pos + 12 <= len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if crc != masked_crc32c(header) or end > len(raw):
            return
        data = raw[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", raw[end - 4:end])
        if dcrc != masked_crc32c(data):
            return
        yield data
        pos = end


_event_files = 0  # files opened by this process (makes every name unique, as TensorBoard's own)


class EventWriter:
    """Appends TensorBoard ``Event`` records to one event file."""

    def __init__(self, folder: str):
        from .proto import tensorboard_pb2  # noqa: PLC0415

        self._pb = tensorboard_pb2
        global _event_files
        _event_files += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{_event_files:04d}.caffelite")
        self.path = os.path.join(folder, name)
        self._file = open(self.path, "ab")
        self._write(self._pb.Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._file.write(frame_record(event.SerializeToString()))
        self._file.flush()

    def start(self, step: int) -> None:
        """A SessionLog START: TensorBoard drops points after ``step`` from earlier files."""
        event = self._pb.Event(wall_time=time.time(), step=step)
        event.session_log.status = self._pb.SessionLog.START
        self._write(event)

    def scalars(self, step: int, values: dict, wall_time: float | None = None) -> None:
        event = self._pb.Event(wall_time=wall_time or time.time(), step=step)
        for tag, value in values.items():
            if value is not None:
                event.summary.value.add(tag=tag, simple_value=float(value))
        self._write(event)

    def close(self) -> None:
        self._file.close()


# ---- the solver callback ------------------------------------------------------------------------
def output_keys(names_and_counts) -> list[str]:
    keys = []
    for name, count in names_and_counts:
        keys += [name] if count == 1 else [f"{name}_{k}" for k in range(count)]
    return keys


def _keys_of(results) -> list[tuple[str, float]]:
    """(key, value) for (name, value, weight) results, numbering repeated names."""
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name, _, _ in results:
        counts[name] = counts.get(name, 0) + 1
    out = []
    for name, value, _ in results:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append((name if counts[name] == 1 else f"{name}_{k}", value))
    return out


def _test_prefix(test_net_id: int) -> str:
    return "test" if test_net_id == 0 else f"test{test_net_id}"


def _text(value) -> str:
    """The shortest text that reads back as the same value (float32 values stay short)."""
    value = float(value)
    single = np.float32(value)
    if math.isfinite(value) and float(single) == value:
        return str(single)
    return repr(value)


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class RunRecorder:
    """Writes the metrics files of one training run into ``folder`` (see the module doc)."""

    def __init__(self, folder: str, tensorboard: bool = True):
        self.folder = folder
        self.tensorboard = tensorboard
        self._csv = self._jsonl = self._events = None
        self.columns: list[str] = []

    # -- solver hooks --
    def on_solve_start(self, solver) -> None:
        os.makedirs(self.folder, exist_ok=True)
        columns = list(FIXED_COLUMNS)
        columns += ["train/" + k for k in output_keys(
            (n, b.count) for n, b in zip(solver.net.output_blob_names, solver.net.output_blobs))]
        for i, net in enumerate(solver.test_nets):
            columns += [f"{_test_prefix(i)}/{k}" for k in output_keys(
                (n, b.count) for n, b in zip(net.output_blob_names, net.output_blobs))]
        self.columns = columns
        csv_path = os.path.join(self.folder, CSV_NAME)
        jsonl_path = os.path.join(self.folder, JSONL_NAME)
        _restart_csv(csv_path, columns, solver.iter)
        _restart_jsonl(jsonl_path, solver.iter)
        self._csv = open(csv_path, "a", newline="", encoding="utf-8")
        self._csv_writer = csv.DictWriter(self._csv, columns, extrasaction="ignore")
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if self.tensorboard:
            self._events = EventWriter(self.folder)
            self._events.start(solver.iter)
        log.info("Writing metrics to %s (metrics.csv, metrics.jsonl%s)", self.folder,
                 ", TensorBoard events" if self.tensorboard else "")

    def on_display(self, solver, outputs) -> None:
        lr = solver.current_lr()
        values = {"train/" + k: v for k, v in _keys_of(outputs)}
        self._row(solver.iter, "train", lr, float(solver.smoothed_loss), values,
                  {k: v for k, v in _keys_of(outputs)})

    def on_test(self, solver, test_net_id, results) -> None:
        prefix = _test_prefix(test_net_id)
        pairs = _keys_of(results)
        self._row(solver.iter, prefix, None, None, {f"{prefix}/{k}": v for k, v in pairs}, dict(pairs))

    def on_solve_end(self, solver) -> None:
        self.close()

    # -- writing --
    def _row(self, iteration: int, phase: str, lr, loss, columns: dict, outputs: dict) -> None:
        if self._csv is None:
            return
        now = time.time()
        row = {"iteration": iteration, "wall_time": f"{now:.3f}", "phase": phase,
               "lr": "" if lr is None else _text(lr), "loss": "" if loss is None else _text(loss)}
        row.update({k: _text(v) for k, v in columns.items()})
        self._csv_writer.writerow(row)
        self._csv.flush()
        record = {"iteration": iteration, "wall_time": round(now, 3), "phase": phase}
        if lr is not None:
            record["lr"] = _number(lr)
        if loss is not None:
            record["loss"] = _number(loss)
        record["outputs"] = {k: _number(v) for k, v in outputs.items()}
        for key in ("lr", "loss"):
            if record.get(key) is not None:
                record[key] = float(_text(record[key]))
        record["outputs"] = {k: (None if v is None else float(_text(v))) for k, v in record["outputs"].items()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            scalars = dict(columns)
            if phase == "train":
                scalars["train/smoothed_loss"] = loss
                scalars["train/lr"] = lr
            self._events.scalars(iteration, {k: v for k, v in scalars.items() if v is not None}, now)

    def close(self) -> None:
        for f in (self._csv, self._jsonl, self._events):
            if f is not None:
                f.close()
        self._csv = self._jsonl = self._events = None


def _iteration(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _restart_csv(path: str, columns: list[str], resume_iter: int) -> None:
    """Start metrics.csv anew (fresh run) or keep the rows before ``resume_iter`` (resumed run)."""
    kept = []
    if resume_iter > 0 and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                it = _iteration(row.get("iteration"))
                if it is not None and it < resume_iter and None not in row.values():
                    kept.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(kept)
    write_text(path, out.getvalue())


def _restart_jsonl(path: str, resume_iter: int) -> None:
    kept = []
    if resume_iter > 0 and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and (_iteration(record.get("iteration")) or 0) < resume_iter:
                    kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


# ---- the resolved configuration ----------------------------------------------------------------
def resolved_solver(param):
    """A copy of a SolverParameter with its net files read in (net -> net_param, ...), so the
    one file reproduces the run."""
    from .config import load_net  # noqa: PLC0415
    from .proto import pb  # noqa: PLC0415

    out = pb.SolverParameter()
    out.CopyFrom(param)
    if out.HasField("net"):
        out.net_param.CopyFrom(load_net(out.net))
        out.ClearField("net")
    if out.HasField("train_net"):
        out.train_net_param.CopyFrom(load_net(out.train_net))
        out.ClearField("train_net")
    for path in out.test_net:
        out.test_net_param.add().CopyFrom(load_net(path))
    out.ClearField("test_net")
    return out


def _to_text(msg) -> tuple[str, str]:
    """(text, extension): YAML through caffelite.yaml_writer, or prototxt without it."""
    try:
        from .yaml_writer import message_to_yaml  # noqa: PLC0415
    except ImportError:
        from google.protobuf import text_format  # noqa: PLC0415

        return text_format.MessageToString(msg), ".prototxt"
    return message_to_yaml(msg), ".yaml"


def write_resolved_config(folder: str, param, protect=()) -> list[str]:
    """Write ``resolved_solver.<yaml|prototxt>`` (self-contained: the nets are inside) and
    ``resolved_train_net.<...>`` into ``folder``; never over a file in ``protect``."""
    os.makedirs(folder, exist_ok=True)
    solver = resolved_solver(param)
    net = solver.train_net_param if solver.HasField("train_net_param") else solver.net_param
    written = []
    for stem, msg in (("resolved_solver", solver), ("resolved_train_net", net)):
        text, ext = _to_text(msg)
        path = os.path.join(folder, stem + ext)
        if any(os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path) for p in protect):
            continue
        write_text(path, text)
        written.append(path)
    return written


__all__ = ["RunRecorder", "EventWriter", "crc32c", "masked_crc32c", "frame_record", "read_records",
           "write_resolved_config", "resolved_solver", "CSV_NAME", "JSONL_NAME"]
