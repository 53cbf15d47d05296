"""Net summary, the run folder (metrics.csv/.jsonl, TensorBoard events, resolved config), the
progress bar."""
import csv
import json
import re
import struct

import pytest

from caffelite.cli import main
from caffelite.config import load_solver, parse_net
from caffelite.layers.base import TRAIN
from caffelite.metrics import crc32c, frame_record, masked_crc32c, read_records
from caffelite.net import Net
from caffelite.proto import tensorboard_pb2 as tb
from caffelite.summary import net_summary, summary_lines

SMALL = """name: small
layer:
  - {name: in, type: Input, top: [x, t], input_param: {shape: [{dim: [2, 3]}, {dim: [2, 2]}]}}
  - {name: ip1, type: InnerProduct, bottom: x, top: h, inner_product_param: {num_output: 4}}
  - {name: relu, type: ReLU, bottom: h, top: h}
  - {name: ip2, type: InnerProduct, bottom: h, top: y, inner_product_param: {num_output: 2}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""


def test_net_summary_counts_parameters_and_memory():
    net = Net(parse_net(SMALL), phase=TRAIN)
    info = net_summary(net)
    assert info["params"] == (3 * 4 + 4) + (4 * 2 + 2)
    values = 6 + 4 + 8 + 4 + 1  # x, t, h (ReLU in place: once), y, loss
    assert info["memory_bytes"] == 2 * (values + info["params"]) * 4  # data + diff, float32
    lines = summary_lines(net)
    assert lines[0] == ("Net 'small' (TRAIN): 5 layers, 26 parameters (0.00 MB), about 0.0 MB for data "
                        "and diffs (float32)")
    assert re.match(r"\s+layer\s+type\s+top shapes\s+params$", lines[1])
    assert re.match(r"\s+in\s+Input\s+x 2x3\s+0$", lines[2])
    assert re.match(r"\s+t 2x2\s*$", lines[3])
    assert re.match(r"\s+ip1\s+InnerProduct\s+h 2x4\s+16$", lines[4])
    assert re.match(r"\s+loss\s+EuclideanLoss\s+loss scalar\s+0$", lines[-1])


def test_shared_parameters_are_counted_once():
    net = Net(parse_net("""name: shared
layer:
  - {name: in, type: Input, top: [x, t], input_param: {shape: [{dim: [2, 4]}, {dim: [2, 4]}]}}
  - {name: ip1, type: InnerProduct, bottom: x, top: h, param: [{name: w}, {name: b}],
     inner_product_param: {num_output: 4}}
  - {name: ip2, type: InnerProduct, bottom: h, top: y, param: [{name: w}, {name: b}],
     inner_product_param: {num_output: 4}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""), phase=TRAIN)
    info = net_summary(net)
    assert info["per_layer"] == [0, 20, 0, 0]
    assert info["params"] == 20


def test_time_and_test_log_the_summary(tmp_path, capsys):
    net = tmp_path / "net.yaml"
    net.write_text(SMALL)
    assert main(["time", "--model", str(net), "--iterations", "1"]) == 0
    err = capsys.readouterr().err
    assert "Net 'small' (TRAIN): 5 layers, 26 parameters" in err
    assert re.search(r"\]   ip2\s+InnerProduct\s+y 2x2\s+10\n", err)


# ---- TensorBoard record framing ------------------------------------------------------------------------
def test_crc32c_and_record_framing(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0 and masked_crc32c(b"") == 0xA282EAD8
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector
    payload = b"hello events"
    record = frame_record(payload)
    assert record[:8] == struct.pack("<Q", len(payload))
    assert struct.unpack("<I", record[8:12])[0] == masked_crc32c(record[:8])
    assert struct.unpack("<I", record[-4:])[0] == masked_crc32c(payload)
    path = tmp_path / "events"
    path.write_bytes(record + frame_record(b"second") + record[:-3])  # a torn last record
    assert list(read_records(str(path))) == [payload, b"second"]


# ---- the run folder ---------------------------------------------------------------------------------------
NET = """name: tiny
layer:
  - {name: data, type: DummyData, top: [x, t],
     dummy_data_param: {shape: [{dim: [4, 6]}, {dim: [4, 3]}], data_filler: [{type: gaussian}]}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 3}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""
SOLVER = """net: net.yaml
test_iter: 2
test_interval: 10
base_lr: 0.01
lr_policy: step
gamma: 0.5
stepsize: 10
max_iter: {max_iter}
display: 5
snapshot: 10
snapshot_prefix: snaps/tiny
solver_mode: CPU
random_seed: 1
"""


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_events(folder):
    events = [[tb.Event.FromString(r) for r in read_records(str(path))]
              for path in folder.glob("events.out.tfevents.*")]
    return sorted(events, key=lambda file: file[0].wall_time)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.yaml").write_text(NET)
    (tmp_path / "solver.yaml").write_text(SOLVER.format(max_iter=20))
    assert main(["train", "--solver", "solver.yaml", "--run_dir", "runs/a"]) == 0
    return tmp_path / "runs" / "a"


def test_metrics_files(run_dir):
    rows = read_csv(run_dir / "metrics.csv")
    assert list(rows[0]) == ["iteration", "wall_time", "phase", "lr", "loss", "train/loss", "test/loss"]
    assert [(r["iteration"], r["phase"]) for r in rows] == [
        ("0", "test"), ("0", "train"), ("5", "train"), ("10", "test"), ("10", "train"), ("15", "train"),
        ("20", "test")]
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["lr"] for r in train] == ["0.01", "0.01", "0.005", "0.005"]
    assert all(float(r["loss"]) > 0 and r["test/loss"] == "" for r in train)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(rows)
    assert records[1]["phase"] == "train" and records[1]["lr"] == 0.01
    assert records[1]["loss"] == pytest.approx(float(rows[1]["loss"]))
    assert set(records[0]["outputs"]) == {"loss"}


def test_tensorboard_events(run_dir):
    (events,) = read_events(run_dir)
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == tb.SessionLog.START and events[1].step == 0
    scalars = {}
    for event in events[2:]:
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [s for s, _ in scalars["train/smoothed_loss"]] == [0, 5, 10, 15]
    assert scalars["train/lr"][2] == (10, pytest.approx(0.005))
    assert [s for s, _ in scalars["test/loss"]] == [0, 10, 20]
    assert set(scalars) == {"train/smoothed_loss", "train/lr", "train/loss", "test/loss"}


def test_resolved_configuration_reproduces_the_run(run_dir):
    solver = load_solver(run_dir / "resolved_solver.yaml")
    assert solver.HasField("net_param") and not solver.HasField("net")
    assert [layer.name for layer in solver.net_param.layer] == ["data", "ip", "loss"]
    assert solver.max_iter == 20 and solver.base_lr == pytest.approx(0.01)
    assert (run_dir / "resolved_train_net.yaml").is_file()


def test_a_resumed_run_replaces_the_rows_it_redoes(run_dir, tmp_path):
    before = read_csv(run_dir / "metrics.csv")
    (tmp_path / "solver.yaml").write_text(SOLVER.format(max_iter=30))
    assert main(["train", "--solver", "solver.yaml", "--run_dir", "runs/a",
                 "--snapshot", "snaps/tiny_iter_10.solverstate"]) == 0
    rows = read_csv(run_dir / "metrics.csv")
    keys = [(r["iteration"], r["phase"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert keys == [("0", "test"), ("0", "train"), ("5", "train"), ("10", "test"), ("10", "train"),
                    ("15", "train"), ("20", "test"), ("20", "train"), ("25", "train"), ("30", "test")]
    assert rows[:3] == before[:3]  # the rows before the resume point are kept as they were
    # The resumed run repeats the interrupted one exactly: same numbers at the same iterations.
    for old, new in zip(before[3:], rows[3:7]):
        assert (old["loss"], old["test/loss"]) == (new["loss"], new["test/loss"])
    _, second = read_events(run_dir)
    assert second[1].session_log.status == tb.SessionLog.START and second[1].step == 10
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_progress_bar_and_caffe_lines_together(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.yaml").write_text(NET)
    (tmp_path / "solver.yaml").write_text(SOLVER.format(max_iter=20))
    assert main(["train", "--solver", "solver.yaml", "--run_dir", "none", "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"train: +\d+%\|.*\| *\d+/20 \[", err)
    assert "iter/s" in err
    assert re.search(r"\] Iteration 5 \([\d.e+]+ iter/s", err)  # Caffe's lines still there
    assert "Test net output #0: loss" in err
    # Without a terminal (and without --progress on) there is no bar at all.
    assert main(["train", "--solver", "solver.yaml", "--run_dir", "none"]) == 0
    assert "%|" not in capsys.readouterr().err
