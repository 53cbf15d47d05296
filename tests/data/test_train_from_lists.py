"""End-to-end training from an ImageData list file and from an HDF5Data list file."""
import h5py
import numpy as np
import pytest
from PIL import Image

from caffelite.config import parse_net, parse_solver
from caffelite.errors import DataError
from caffelite.solvers.base import create_solver

NET = """
name: tiny
layer:
  - name: data
    type: {type}
    top: [data, label]
    {data_param}
  - {{name: ip, type: InnerProduct, bottom: data, top: ip,
     inner_product_param: {{num_output: 2, weight_filler: {{type: gaussian, std: 0.01}}}}}}
  - {{name: loss, type: SoftmaxWithLoss, bottom: [ip, label], top: loss}}
"""
SOLVER = ("base_lr: 0.05\nmomentum: 0.9\nlr_policy: fixed\nmax_iter: 30\nrandom_seed: 3\ndisplay: 0\n"
          "snapshot_after_train: false\n")


def train(type, data_param, iterations=30):
    solver_param = parse_solver(SOLVER)
    solver_param.net_param.CopyFrom(parse_net(NET.format(type=type, data_param=data_param)))
    solver = create_solver(solver_param)
    try:
        losses = []
        for _ in range(iterations):
            solver.step(1)
            losses.append(float(solver.loss))
        return losses
    finally:
        solver.close()


def test_train_from_an_image_list(tmp_path):
    """20 small PNGs in two colours; the label is the colour."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(20):
        colour = (200, 40, 40) if i % 2 else (40, 40, 200)
        pixels = np.clip(rng.normal(colour, 20, (6, 6, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(tmp_path / f"{i:02d}.png")
        lines.append(f"{i:02d}.png {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    losses = train("ImageData", f"""transform_param: {{scale: 0.00390625, mirror: true}}
    image_data_param: {{source: {tmp_path / 'train.txt'}, batch_size: 10, shuffle: true}}""")
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert losses[0] == pytest.approx(np.log(2), abs=0.1)


def test_train_from_an_hdf5_list(tmp_path):
    rng = np.random.default_rng(1)
    for part in range(2):
        label = rng.integers(0, 2, 15)
        data = rng.normal(0, 1, (15, 3, 4, 4)) + (2 * label - 1)[:, None, None, None]
        with h5py.File(tmp_path / f"part{part}.h5", "w") as f:
            f["data"] = data.astype(np.float32)
            f["label"] = label.astype(np.float32)
    (tmp_path / "train.txt").write_text("part0.h5\npart1.h5\n")
    losses = train("HDF5Data", f"hdf5_data_param: {{source: {tmp_path / 'train.txt'}, batch_size: 10, "
                               "shuffle: true}")
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_hdf5_file_without_the_label_dataset(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["data"] = np.zeros((4, 3), np.float32)
        f["labels"] = np.zeros(4, np.float32)
    (tmp_path / "train.txt").write_text("x.h5\n")
    with pytest.raises(DataError, match=r"HDF5 file '.*x.h5' has no dataset 'label' "
                                        r"\(it holds: data, labels\)"):
        train("HDF5Data", f"hdf5_data_param: {{source: {tmp_path / 'train.txt'}, batch_size: 2}}")


def test_shuffled_hdf5_rank_slices_cover_each_epoch(tmp_path):
    """Rank r of 2 (seeded seed + r by the solver) reads its own half of the same permutation."""
    from caffelite.blob import Blob
    from caffelite.layers.base import TRAIN, LayerContext
    from layer_testing import make_layer

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(12, dtype=np.float32)[:, None]
    (tmp_path / "list.txt").write_text("a.h5\n")
    seen = []
    for rank in (0, 1):
        layer = make_layer("HDF5Data", top=["data"], phase=TRAIN,
                           hdf5_data_param={"source": str(tmp_path / "list.txt"), "batch_size": 3,
                                            "shuffle": True})
        layer.ctx = LayerContext(phase=TRAIN, seed=40 + rank, rank=rank, world_size=2)
        top = [Blob(())]
        layer.layer_setup([], top)
        rows = []
        for _ in range(4):
            layer.forward([], top)
            rows += top[0].cpu_data()[:, 0].astype(int).tolist()
        seen.append(rows)
    for epoch in range(2):
        both = seen[0][6 * epoch:6 * epoch + 6] + seen[1][6 * epoch:6 * epoch + 6]
        assert sorted(both) == list(range(12))
