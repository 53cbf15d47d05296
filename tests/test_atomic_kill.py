"""kill -9 at random moments while snapshotting: every snapshot file left is complete and loadable."""
import json
import os
import subprocess
import sys
from pathlib import Path

from caffelite.io.atomic import is_temp_file
from caffelite.solvers.snapshots import check_complete, latest_snapshot, list_snapshots

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter (no threads), forks one trainer per trial and kills it with
# SIGKILL after a random delay; after each kill it parses every snapshot file present.
SERVER = r'''
import json, os, random, signal, sys, time
import numpy as np
from google.protobuf import text_format
from caffelite.io.atomic import is_temp_file
from caffelite.io.solverstate import read_extra, read_solverstate
from caffelite.io.weights import load_weights
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from caffelite.solvers.base import create_solver

NET = """name: "big"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 2 dim: 512 } shape { dim: 2 dim: 256 } data_filler { type: "gaussian" } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 256 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""

def trainer(prefix, fmt):
    import logging
    logging.disable(logging.CRITICAL)
    sp = pb.SolverParameter(base_lr=0.001, momentum=0.9, lr_policy="fixed", max_iter=10**6, snapshot=1,
                            snapshot_prefix=prefix, random_seed=3, solver_mode=pb.SolverParameter.CPU)
    sp.snapshot_format = fmt
    sp.net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    create_solver(sp).solve()

def check(folder):
    """(problems, files checked, temporary files seen)."""
    problems, checked, temps = [], 0, 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_temp_file(name):
            temps += 1
            continue
        try:
            if name.endswith((".caffemodel", ".caffemodel.h5")):
                for layer in load_weights(path).layer:
                    for blob in layer.blobs:
                        blob_proto_to_array(blob)
            elif name.endswith((".solverstate", ".solverstate.h5")):
                state = read_solverstate(path)
                assert len(state.history) == 2, "history"
            elif name.endswith(".json"):
                assert read_extra(path[:-5])["iter"] >= 1
            else:
                raise AssertionError("unexpected file")
            checked += 1
        except BaseException as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    return problems, checked, temps

root, trials = sys.argv[1], int(sys.argv[2])
rng = random.Random(1234)
report = {"problems": [], "checked": 0, "max_temps": 0, "trials": 0}
for trial in range(trials):
    fmt = trial % 2  # HDF5 = 0, BINARYPROTO = 1
    folder = os.path.join(root, "h5" if fmt == 0 else "bin")
    os.makedirs(folder, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        try:
            trainer(os.path.join(folder, "k"), fmt)
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0.02, 0.2))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    problems, checked, temps = check(folder)
    report["problems"] += [f"trial {trial}: {p}" for p in problems]
    report["checked"] += checked
    report["max_temps"] = max(report["max_temps"], temps)
    report["trials"] += 1
print(json.dumps(report))
'''


def test_kill_9_while_snapshotting_leaves_only_complete_files(tmp_path):
    trials = 20
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SERVER, str(tmp_path), str(trials)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["trials"] == trials
    assert report["problems"] == []
    assert report["checked"] > 0
    # Some kills landed in the middle of a write: their temporary files are still there.
    assert report["max_temps"] > 0
    for folder in ("bin", "h5"):
        prefix = str(tmp_path / folder / "k")
        sets = list_snapshots(prefix)
        complete = [s for s in sets if check_complete(s) is None]
        assert complete, [s.iter for s in sets]
        # --snapshot auto takes the newest complete set; only the newest can be incomplete
        # (a kill before its solver state was written).
        assert latest_snapshot(prefix) == complete[0].state
        assert all(s.iter == sets[0].iter for s in sets if s not in complete)
        leftovers = [p for p in (tmp_path / folder).iterdir() if is_temp_file(p.name)]
        assert all(p.name.startswith(".k_iter_") for p in leftovers)
