"""The model zoo against a loopback HTTP server: manifest checksums, the cache and its
stamps, mirrors, clear errors; ``zoo:NAME`` weights; fine-tuning copies layers by name.
The downloader itself (resume, retries, timeouts) is tested in test_download.py."""
import hashlib
import re
import socket

import numpy as np
import pytest
import yaml

from caffelite import zoo
from caffelite.cli import main
from caffelite.config import parse_net
from caffelite.errors import ConfigError, DataError
from caffelite.io.weights import copy_weights
from caffelite.layers.base import TEST
from caffelite.net import Net
from test_download import PAYLOAD, LoopbackServer

UPSTREAM = "http://models.example.invalid/files/tiny.caffemodel"  # never reached: tests use --mirror


@pytest.fixture
def server():
    with LoopbackServer({"/files/tiny.caffemodel": PAYLOAD}) as srv:
        yield srv


def make_zoo(root, name="tiny", payload=PAYLOAD, **front):
    meta = {"name": "A tiny test model", "caffemodel": "tiny.caffemodel", "caffemodel_url": UPSTREAM,
            "sha1": hashlib.sha1(payload).hexdigest(), "license": "test-only", "parameters": 10}
    meta.update(front)
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "README.md").write_text("---\n" + yaml.safe_dump(meta) + "---\n\n# tiny\n")
    return zoo.load_manifest(root)[name]


@pytest.fixture
def new_model(tmp_path, monkeypatch):
    """``new_model(**front)``: model 'tiny' of a zoo in tmp_path/zoo, cached in tmp_path/cache."""
    monkeypatch.setenv("CAFFELITE_MODEL_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("CAFFELITE_ZOO_DIR", str(tmp_path / "cache"))
    return lambda **front: make_zoo(tmp_path / "zoo", **front)


@pytest.fixture
def tiny(new_model):
    return new_model()


def fetch(model, server, **kw):
    kw.setdefault("sleep", lambda s: None)
    return zoo.download(model, mirror=server.base, progress=False, timeout=kw.pop("timeout", 5), **kw)


# ---- downloading ----------------------------------------------------------------------------
def test_full_download_is_verified_and_renamed(tiny, server, tmp_path):
    path = fetch(tiny, server)
    assert path == tmp_path / "cache" / "tiny" / "tiny.caffemodel"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("tiny.caffemodel.part").exists()
    assert server.requests == [("/files/tiny.caffemodel", None)]  # the mirror keeps the path
    assert zoo.cache_status(tiny) == "verified"


def test_wrong_bytes_fail_with_both_hashes_and_leave_nothing(tiny, server, tmp_path, capsys):
    server.mode = "wrong"
    code = main(["zoo", "download", "tiny", "--mirror", server.base, "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 3
    assert tiny.sha1 in err and hashlib.sha1(PAYLOAD[::-1]).hexdigest() in err
    assert "checksum mismatch" in err and "another --mirror" in err
    assert not list((tmp_path / "cache" / "tiny").glob("tiny.caffemodel*"))  # no .part, no final file


def test_manifest_mirrors_are_tried_after_the_url(new_model, server):
    model = new_model(caffemodel_url=server.base + "/gone/tiny.caffemodel",
                     mirrors=[server.base + "/files/tiny.caffemodel"])
    path = zoo.download(model, progress=False, timeout=5)
    assert path.read_bytes() == PAYLOAD and zoo.cache_status(model) == "verified"
    assert [p for p, _ in server.requests] == ["/gone/tiny.caffemodel", "/files/tiny.caffemodel"]


def test_sha256_is_checked_when_given(new_model, server):
    model = new_model(sha256="0" * 64)
    with pytest.raises(DataError, match=r"sha256 expected 0{64}, got " + hashlib.sha256(PAYLOAD).hexdigest()):
        fetch(model, server)


def test_404_is_a_clear_error_without_retries(tiny, server, tmp_path):
    del server.files["/files/tiny.caffemodel"]
    with pytest.raises(DataError) as info:
        fetch(tiny, server)
    message = str(info.value)
    assert "HTTP 404" in message
    assert UPSTREAM in message and str(tmp_path / "cache" / "tiny" / "tiny.caffemodel") in message
    assert len(server.requests) == 1


def test_offline_message_names_url_and_place(tiny, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DataError) as info:
        zoo.download(tiny, mirror=dead, retries=1, backoff=0.0, progress=False)
    message = str(info.value)
    assert "offline" in message and f"fetch {UPSTREAM} by hand" in message
    assert f"put it at {tmp_path / 'cache' / 'tiny' / 'tiny.caffemodel'}" in message


def test_verified_file_is_not_fetched_again(tiny, server):
    fetch(tiny, server)
    server.requests.clear()
    fetch(tiny, server)
    assert server.requests == []


def test_file_placed_by_hand_is_verified_not_fetched(tiny, server, tmp_path):
    path = tmp_path / "cache" / "tiny" / "tiny.caffemodel"
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert zoo.cache_status(tiny) == "unverified"
    assert fetch(tiny, server) == path
    assert server.requests == [] and zoo.cache_status(tiny) == "verified"


def test_no_published_checksum_needs_trust_unverified(new_model, server, caplog):
    model = new_model(sha1=None)
    with pytest.raises(ConfigError, match="no checksum is known.*--trust-unverified"):
        fetch(model, server)
    assert server.requests == []
    path = fetch(model, server, trust_unverified=True)
    assert hashlib.sha1(PAYLOAD).hexdigest() in caplog.text
    assert zoo.cache_status(model) == "trusted"
    assert zoo.resolve_weights("zoo:tiny") == str(path)


def test_unverifiable_file_placed_by_hand_is_used_only_once_accepted(new_model, server):
    model = new_model(sha1=None)
    path = zoo.cached_path(model)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    with pytest.raises(ConfigError, match="cannot be verified.*--trust-unverified"):
        zoo.resolve_weights("zoo:tiny")
    assert fetch(model, server, trust_unverified=True) == path and server.requests == []
    assert zoo.resolve_weights("zoo:tiny") == str(path)


def test_mirror_url_replaces_scheme_and_host_only():
    url = "http://dl.example.org/models/a.caffemodel?x=1"
    assert zoo.mirror_url(url, "https://m.example.net") == "https://m.example.net/models/a.caffemodel?x=1"
    assert zoo.mirror_url(url, "https://m.example.net/caffe/") == "https://m.example.net/caffe/models/a.caffemodel?x=1"
    with pytest.raises(ConfigError, match="not a base URL"):
        zoo.mirror_url(url, "m.example.net")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CAFFELITE_ZOO_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "caffelite" / "zoo"
    monkeypatch.setenv("CAFFELITE_ZOO_DIR", str(tmp_path / "env"))
    assert zoo.cache_dir() == tmp_path / "env"
    assert zoo.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("CAFFELITE_ZOO_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "caffelite" / "zoo"


# ---- zoo:NAME as weights --------------------------------------------------------------------
def test_zoo_spec_resolves_only_when_downloaded_and_verified(tiny, server, tmp_path):
    with pytest.raises(ConfigError, match=r"not downloaded yet.*caffelite zoo download tiny"):
        zoo.resolve_weights("zoo:tiny")
    path = fetch(tiny, server)
    assert zoo.resolve_weights("zoo:tiny") == str(path)
    # A solver's relative-path rule may have put a folder in front.
    assert zoo.resolve_weights(str(tmp_path / "solvers" / "zoo:tiny")) == str(path)
    assert zoo.resolve_weights("plain/path.caffemodel") == "plain/path.caffemodel"
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        zoo.resolve_weights("zoo:tinny")
    with open(path, "r+b") as f:  # tampered with after download: the stamp no longer matches
        f.write(b"\0")
    with pytest.raises(DataError, match="do not match the model zoo's checksum"):
        zoo.resolve_weights("zoo:tiny")


PRETRAINED = """
name: pretrained
layer:
  - {name: data, type: Input, top: data, input_param: {shape: {dim: [2, 1, 6, 6]}}}
  - {name: conv1, type: Convolution, bottom: data, top: conv1,
     convolution_param: {num_output: 3, kernel_size: 3, weight_filler: {type: gaussian, std: 1},
                         bias_filler: {type: gaussian, std: 1}}}
  - {name: fc7, type: InnerProduct, bottom: conv1, top: fc7,
     inner_product_param: {num_output: 5, weight_filler: {type: gaussian, std: 1},
                           bias_filler: {type: gaussian, std: 1}}}
  - {name: %(last)s, type: InnerProduct, bottom: fc7, top: %(last)s,
     param: [{lr_mult: 10}, {lr_mult: 20}],
     inner_product_param: {num_output: %(n)d, weight_filler: {type: constant, value: 0.5},
                           bias_filler: {type: constant, value: 0.25}}}
"""


def pretrained_zoo(tmp_path, new_model):
    """A 'pretrained' net saved as a caffemodel and registered as zoo model 'tiny', already cached."""
    net = Net(parse_net(PRETRAINED % {"last": "fc8", "n": 4}), phase=TEST, seed=3)
    blob_file = tmp_path / "pretrained.caffemodel"
    net.save(str(blob_file))
    payload = blob_file.read_bytes()
    model = new_model(payload=payload)
    cached = zoo.cached_path(model)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(payload)
    return net


def test_finetuning_copies_by_name_and_keeps_the_renamed_layer_fresh(tmp_path, new_model):
    pretrained = pretrained_zoo(tmp_path, new_model)
    net = Net(parse_net(PRETRAINED % {"last": "fc8_new", "n": 2}), phase=TEST, seed=4)
    copy_weights(net, "zoo:tiny")
    for name in ("conv1", "fc7"):
        for got, want in zip(net.params[name], pretrained.params[name]):
            np.testing.assert_array_equal(got.cpu_data(), want.cpu_data())
    weight, bias = net.params["fc8_new"]
    assert weight.shape == (2, 5) and np.all(weight.cpu_data() == 0.5) and np.all(bias.cpu_data() == 0.25)
    # Keeping the old name with a new size is a clear error, not a silent partial copy.
    same_name = Net(parse_net(PRETRAINED % {"last": "fc8", "n": 2}), phase=TEST)
    with pytest.raises(ConfigError, match="shape mismatch.*rename"):
        copy_weights(same_name, "zoo:tiny")


def test_train_command_takes_zoo_weights(tmp_path, new_model, capsys):
    pretrained = pretrained_zoo(tmp_path, new_model)
    net_text = (PRETRAINED % {"last": "fc8_new", "n": 2}).replace(
        "{name: data, type: Input, top: data, input_param: {shape: {dim: [2, 1, 6, 6]}}}",
        "{name: data, type: DummyData, top: [data, label], dummy_data_param: "
        "{shape: [{dim: [2, 1, 6, 6]}, {dim: [2]}]}}")
    net_text += "  - {name: loss, type: SoftmaxWithLoss, bottom: [fc8_new, label], top: loss}\n"
    (tmp_path / "train.yaml").write_text(net_text)
    (tmp_path / "solver.yaml").write_text(
        "net: train.yaml\nbase_lr: 0\nlr_policy: fixed\nmax_iter: 1\ndisplay: 0\n"
        f"snapshot_after_train: true\nsnapshot_prefix: {tmp_path}/ft\nrandom_seed: 1\n")
    code = main(["train", "--solver", str(tmp_path / "solver.yaml"), "--weights", "zoo:tiny"])
    assert code == 0, capsys.readouterr().err[-2000:]
    trained = Net(parse_net(net_text), phase=TEST)
    copy_weights(trained, str(tmp_path / "ft_iter_1.caffemodel"))
    np.testing.assert_array_equal(trained.params["conv1"][0].cpu_data(), pretrained.params["conv1"][0].cpu_data())
    assert np.all(trained.params["fc8_new"][0].cpu_data() == 0.5)

    code = main(["train", "--solver", str(tmp_path / "solver.yaml"), "--weights", "zoo:other"])
    assert code == 2 and "no model 'other' in the model zoo" in capsys.readouterr().err


# ---- the command line -----------------------------------------------------------------------
def test_zoo_list_shows_every_model_size_license_and_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CAFFELITE_MODEL_ZOO", raising=False)
    monkeypatch.setenv("CAFFELITE_ZOO_DIR", str(tmp_path / "cache"))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("cache:")}
    assert set(rows) == set(zoo.load_manifest())
    assert {"bvlc_alexnet", "bvlc_googlenet", "vgg16", "resnet50", "squeezenet_v1.1", "lenet"} <= set(rows)
    assert re.search(r"bvlc_alexnet\s+~243\.9 MB\s+unrestricted\s+no\s+deploy solver train_val", rows["bvlc_alexnet"])
    assert re.search(r"lenet\s+-\s+BSD-2-Clause\s+- \(no weights\)", rows["lenet"])
    assert f"cache: {tmp_path / 'cache'}" in out


def test_zoo_list_and_info_show_a_cached_model(tiny, server, capsys):
    fetch(tiny, server)
    assert main(["zoo", "list"]) == 0
    assert re.search(r"^tiny\s+~40 B\s+test-only\s+yes\s*$", capsys.readouterr().out, re.M)
    assert main(["zoo", "info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^cached\s+yes \(.*tiny\.caffemodel\)$", out, re.M)
    assert f"sha1            {tiny.sha1}" in out and "--weights zoo:tiny" in out


def test_zoo_download_command(tiny, server, capsys, tmp_path):
    assert main(["zoo", "download", "tiny", "--mirror", server.base, "--dir", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "tiny" / "tiny.caffemodel")
    assert main(["zoo", "download", "nope"]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
