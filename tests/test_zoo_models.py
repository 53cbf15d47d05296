"""Every model zoo definition builds and has the published parameter count; manifests are complete.

Big nets are built with constant fillers (60M gaussian draws are slow), a batch of 1 or 2,
and no forward pass; their data layers become Input layers of the same shape.
"""
import gc
import re

import numpy as np
import pytest

from caffelite import config, zoo
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net

MODELS = zoo.load_manifest()

# Parameters over every blob of the net (weights and biases). ResNet-50: as published, i.e.
# without the BatchNorm statistics and without conv1's bias; see test_resnet50_parameter_blobs.
PUBLISHED = {
    "lenet": 431_080, "cifar10_quick": 145_578, "cifar10_full": 89_578,
    "bvlc_alexnet": 60_965_224, "bvlc_reference_caffenet": 60_965_224, "bvlc_googlenet": 6_998_552,
    "bvlc_reference_rcnn_ilsvrc13": 60_965_224 - (4096 * 1000 + 1000) + (4096 * 200 + 200),
    "finetune_flickr_style": 60_965_224 - (4096 * 1000 + 1000) + (4096 * 20 + 20),
    "vgg16": 138_357_544, "resnet50": 25_557_032, "squeezenet_v1.1": 1_235_496,
}
# GoogLeNet's two auxiliary classifiers exist only in training.
TRAIN_VAL = dict(PUBLISHED, bvlc_googlenet=6_998_552 + 3_188_840 + 3_190_888)
DATA_SHAPE = {"lenet": (1, 28, 28), "cifar10_quick": (3, 32, 32), "cifar10_full": (3, 32, 32)}
FILES = sorted((name, f) for name, m in MODELS.items() for f in m.definitions() if f != "solver.yaml"
               and "solver" not in f)


def light(param, batch):
    """Constant fillers, and every Input/Data layer at batch size ``batch``."""
    for lp in param.layer:
        for sub in ("convolution_param", "inner_product_param"):
            if lp.HasField(sub):
                for filler in (getattr(lp, sub).weight_filler, getattr(lp, sub).bias_filler):
                    filler.Clear()
                    filler.type = "constant"
        if lp.type == "Input":
            for shape in lp.input_param.shape:
                shape.dim[0] = batch
    return param


def data_to_input(param, model: str, batch: int):
    """Data layers -> Input layers giving tops of the shapes the data layers would give."""
    for lp in param.layer:
        if lp.type != "Data":
            continue
        crop = lp.transform_param.crop_size
        shape = (3, crop, crop) if crop else DATA_SHAPE[model]
        lp.type = "Input"
        lp.ClearField("data_param")
        lp.ClearField("transform_param")
        lp.input_param.shape.add().dim.extend((batch, *shape))
        lp.input_param.shape.add().dim.extend((batch,))
    return param


def build(model: str, fname: str, phase: int) -> Net:
    path = MODELS[model].folder / fname
    param = light(config.load_net(path), batch=1)
    data_to_input(param, model, batch=2)
    return Net(param, phase=phase, source=str(path))


def count(net, skip=lambda layer_name, layer, i: False) -> int:
    return sum(blob.count for name, layer in zip(net.layer_names, net.layers)
               for i, blob in enumerate(layer.blobs) if not skip(name, layer, i))


def not_published(name, layer, i):
    """ResNet-50's published count leaves out BN statistics and conv1's bias."""
    return layer.type == "BatchNorm" or (name == "conv1" and i == 1)


OUTPUTS = {"bvlc_alexnet": ("prob", (1, 1000)), "bvlc_reference_caffenet": ("prob", (1, 1000)),
           "bvlc_googlenet": ("prob", (1, 1000)), "vgg16": ("prob", (1, 1000)),
           "bvlc_reference_rcnn_ilsvrc13": ("fc-rcnn", (1, 200)), "finetune_flickr_style": ("prob", (1, 20)),
           "resnet50": ("prob", (1, 1000)), "squeezenet_v1.1": ("prob", (1, 1000, 1, 1)),
           "lenet": ("prob", (1, 10)), "cifar10_quick": ("prob", (1, 10)), "cifar10_full": ("prob", (1, 10))}


@pytest.mark.parametrize("model,fname", FILES)
def test_definition_builds_with_published_parameter_count(model, fname):
    phases = [TEST] if fname == "deploy.yaml" else [TRAIN, TEST]
    if PUBLISHED[model] > 20_000_000 and len(phases) == 2:
        phases = [TRAIN]  # the big nets differ between phases only in their data layers and accuracy
    for phase in phases:
        net = build(model, fname, phase)
        skip = not_published if model == "resnet50" else (lambda *a: False)
        expected = PUBLISHED[model] if fname == "deploy.yaml" else TRAIN_VAL[model]
        assert count(net, skip) == expected, (model, fname, phase)
        if fname == "train_val.yaml":
            assert any(w for w in net.blob_loss_weights.values()), "a training net needs a loss"
        else:
            blob, shape = OUTPUTS[model]
            assert net.output_blob_names == [blob] and net.blobs[blob].shape == shape
        del net
        gc.collect()  # a few of these nets hold half a gigabyte


def test_every_model_has_a_deploy_net_and_its_manifest_count():
    for name, model in MODELS.items():
        assert "deploy.yaml" in model.definitions(), name
        assert model.parameters == PUBLISHED[name], name
    assert set(PUBLISHED) == set(MODELS)


def test_resnet50_parameter_blobs():
    net = build("resnet50", "deploy.yaml", TEST)
    bn = [layer for layer in net.layers if layer.type == "BatchNorm"]
    assert len(bn) == 53 and sum(b.count for layer in bn for b in layer.blobs) == 53_173
    assert count(net) == 25_557_032 + 64 + 53_173
    assert net.blobs["pool5"].shape == (1, 2048, 1, 1) and net.blobs["prob"].shape == (1, 1000)


@pytest.mark.parametrize("model,out", [("lenet", "prob"), ("cifar10_quick", "prob"), ("cifar10_full", "prob")])
def test_small_deploy_nets_run(model, out):
    path = MODELS[model].folder / "deploy.yaml"
    net = Net(config.load_net(path), phase=TEST, seed=1)
    net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["data"].shape)
    net.forward()
    prob = net.blobs[out].cpu_data()
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)


def test_finetune_net_matches_caffenet_except_the_renamed_last_layer():
    caffenet = build("bvlc_reference_caffenet", "deploy.yaml", TEST)
    finetune = build("finetune_flickr_style", "train_val.yaml", TRAIN)
    ref = {name: [b.shape for b in blobs] for name, blobs in caffenet.params.items()}
    got = {name: [b.shape for b in blobs] for name, blobs in finetune.params.items()}
    assert set(ref) - set(got) == {"fc8"} and set(got) - set(ref) == {"fc8_flickr"}
    assert all(got[name] == ref[name] for name in got if name != "fc8_flickr")
    last = finetune.layer_by_name["fc8_flickr"].layer_param
    assert [p.lr_mult for p in last.param] == [10, 20] and last.inner_product_param.num_output == 20


@pytest.mark.parametrize("model", sorted(MODELS))
def test_solvers_load_and_point_at_their_nets(model):
    for solver in sorted(MODELS[model].folder.glob("*solver*.yaml")):
        param = config.load_solver(solver)
        assert param.net == str(MODELS[model].folder / "train_val.yaml")
        assert "/runs/" in param.snapshot_prefix


def test_manifests_are_complete():
    for name, model in MODELS.items():
        for key in ("name", "caffemodel", "caffemodel_url", "sha1", "license", "source", "accuracy"):
            assert key in model.meta, (name, key)
        assert model.license and model.source.startswith("https://")
        if model.has_weights:
            assert model.url.startswith(("http://", "https://")) and model.caffemodel.endswith(".caffemodel")
            assert all(m.startswith("https://") for m in model.mirrors)
    # Checksums are published facts; only VGG-16 has none, and the downloader says so.
    assert {n for n, m in MODELS.items() if m.has_weights and not m.sha1} == {"vgg16"}
    assert {n for n, m in MODELS.items() if not m.has_weights} == {"lenet", "cifar10_quick", "cifar10_full"}
    assert MODELS["bvlc_alexnet"].sha1 == "9116a64c0fbe4459d18f4bb6b56d647b63920377"
    assert MODELS["bvlc_reference_caffenet"].sha1 == "4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46"
    assert MODELS["bvlc_googlenet"].sha1 == "405fc5acd08a3bb12de8ee5e23a96bec22f08204"
    assert MODELS["bvlc_alexnet"].url == "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel"


def test_readme_commands_name_real_files():
    for name, model in MODELS.items():
        text = (model.folder / "README.md").read_text()
        for path in re.findall(r"model_zoo/([\w./-]+\.yaml)", text):
            assert (zoo.zoo_root() / path).is_file(), (name, path)
        for spec in re.findall(r"zoo:([\w.]+)", text):
            assert spec in MODELS, (name, spec)
